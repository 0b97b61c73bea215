"""Settings from the environment, the CLI's overrides, and the CPU count the server uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.__main__ import build_settings, parse_args
from server.settings import Settings, SettingsError, _cgroup_cpu_quota, available_cpus

pytestmark = pytest.mark.serve


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.model_path == "models/model.onnx"
    assert settings.max_upload_bytes == 10 * 1024 * 1024
    assert settings.prediction_log_path == "var/predictions.db"
    assert settings.drift_window == 500


def test_every_field_is_an_environment_variable():
    env = {
        "MODEL_PATH": "/m.onnx",
        "HOST": "0.0.0.0",
        "PORT": "9000",
        "INTRA_OP_THREADS": "3",
        "MAX_BATCH_SIZE": "4",
        "MAX_QUEUE_DELAY_MS": "1.5",
        "MAX_QUEUE_SIZE": "10",
        "REQUEST_TIMEOUT_S": "2",
        "MAX_UPLOAD_BYTES": "1_000",
        "MAX_PIXELS": "5000",
        "MAX_BATCH_FILES": "7",
        "GRACEFUL_TIMEOUT_S": "3",
        "LOG_LEVEL": "debug",
        "PREDICTION_LOG_PATH": "/tmp/x.db",
        "DRIFT_WINDOW": "50",
        "MODEL_URI": "models:/catsdogs@champion",
    }
    s = Settings.from_env(env)
    assert (s.model_path, s.host, s.port, s.intra_op_threads) == ("/m.onnx", "0.0.0.0", 9000, 3)
    assert (s.max_batch_size, s.max_queue_delay_ms, s.max_queue_size) == (4, 1.5, 10)
    assert (s.request_timeout_s, s.max_upload_bytes, s.max_pixels) == (2.0, 1000, 5000)
    assert (s.max_batch_files, s.graceful_timeout_s, s.log_level) == (7, 3.0, "debug")
    assert (s.prediction_log_path, s.drift_window) == ("/tmp/x.db", 50)
    assert s.model_source == "models:/catsdogs@champion"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("MAX_BATCH_SIZE", "0"),
        ("MAX_QUEUE_DELAY_MS", "nan"),
        ("REQUEST_TIMEOUT_S", "-1"),
        ("MAX_UPLOAD_BYTES", "1.5"),
        ("LOG_LEVEL", "loud"),
        ("SERVED_MODEL_NAME", "a/b"),
    ],
)
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_cli_flags_override_environment():
    env = {"PORT": "9000", "HOST": "10.0.0.1", "MAX_BATCH_SIZE": "4", "MODEL_URI": "models:/a@b"}
    args = parse_args(["--model", "x.onnx", "--host", "0.0.0.0", "--port", "1234"])
    settings = build_settings(args, env)
    assert (settings.model_path, settings.host, settings.port) == ("x.onnx", "0.0.0.0", 1234)
    assert settings.model_uri == ""  # an explicit --model is what gets served
    assert settings.model_source == "x.onnx"
    assert settings.max_batch_size == 4  # unset flags leave the environment alone
    assert build_settings(parse_args([]), env).model_source == "models:/a@b"
    with pytest.raises(SettingsError, match="PORT"):
        build_settings(parse_args(["--port", "99999"]), {})


def test_cpu_count_respects_cgroup_quota(tmp_path: Path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert _cgroup_cpu_quota(v1) == 2.0
    assert 1 <= available_cpus() <= len(__import__("os").sched_getaffinity(0))
