"""The serving environment is torch-free, and importing the app loads nothing heavy."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.serve


def test_torch_is_not_installed():
    with pytest.raises(ImportError):
        import torch  # noqa: F401


@pytest.mark.parametrize("name", ["torch", "torchvision", "mlflow", "dvc"])
def test_training_stack_absent(name):
    assert importlib.util.find_spec(name) is None


def test_import_is_light():
    """Importing the app module neither loads onnxruntime nor a model."""
    code = "import sys, server.app; print('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
