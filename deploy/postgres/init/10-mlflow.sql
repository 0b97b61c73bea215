-- Run once, when the postgres service initialises its volume: MLflow's backend store gets a
-- database of its own beside the prediction store's (POSTGRES_DB, "predictions").
CREATE DATABASE mlflow;
