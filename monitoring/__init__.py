"""Monitoring tools run beside the server: drift reports, deployment evaluation, alerts."""

# Before any module of this package imports onnxruntime or MLflow: see catsdogs.telemetry.
from catsdogs.telemetry import opt_out

opt_out()
