"""Training: the DVC stages that fetch, prepare and split the photos, train and evaluate."""

# Before any module of this package imports onnxruntime or MLflow: see catsdogs.telemetry.
from catsdogs.telemetry import opt_out

opt_out()
