"""Load tests and benchmarks of the server."""

# Before any module of this package imports onnxruntime or MLflow: see catsdogs.telemetry.
from catsdogs.telemetry import opt_out

opt_out()
