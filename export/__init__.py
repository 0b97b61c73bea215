"""Export: the DVC stage that turns the trained model into one ONNX file with its contract."""

# Before any module of this package imports onnxruntime or MLflow: see catsdogs.telemetry.
from catsdogs.telemetry import opt_out

opt_out()
