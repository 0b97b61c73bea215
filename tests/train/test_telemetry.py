"""The pipeline's programs keep their libraries' usage telemetry off (catsdogs.telemetry).

MLflow 3 reports usage and fetches a telemetry configuration from the Internet, and onnxruntime
1.32's wheels report to Microsoft from the moment they are imported; each stops by itself under
CI or pytest, so the check runs a program's imports in a child with those markers removed, as
``dvc repro`` run by hand would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from catsdogs.telemetry import CI_MARKERS, OPT_OUTS

ROOT = Path(__file__).resolve().parents[2]
QUIETING = CI_MARKERS | {name for name, _ in OPT_OUTS}
CHECK = """
import json, os, sys
for module in sys.argv[1:]:
    __import__(module)
import onnxruntime
from mlflow.telemetry.utils import is_telemetry_disabled
home = sorted(os.listdir(os.environ["HOME"]))
print(json.dumps({"mlflow_off": is_telemetry_disabled(), "home": home}))
"""


def imports_of(home: Path, *modules: str) -> dict:
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in QUIETING} | {"HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-c", CHECK, *modules], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_and_export_keep_library_telemetry_off(tmp_path: Path) -> None:
    # the libraries alone, as a deployment's process meets them: both report
    # (onnxruntime's event cache in ~/.cache; MLflow's installation id in ~/.config)
    bare = imports_of(tmp_path / "bare")
    assert bare == {"mlflow_off": False, "home": [".cache", ".config"]}
    # the stages' programs turn both off before the libraries load
    for module in ("training.train", "export.export"):
        assert imports_of(tmp_path / module, module) == {"mlflow_off": True, "home": []}
