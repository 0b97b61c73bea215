"""Cat-or-dog photo classifier: the torch-free serving package."""

# Before any module of this package imports onnxruntime or MLflow: see catsdogs.telemetry.
from catsdogs.telemetry import opt_out

opt_out()

__version__ = "0.1.0"
