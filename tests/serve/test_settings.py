"""Settings from the environment, the CLI's overrides, the CPU count the server uses, and the
flags, ``--help``, ``--version`` and README table generated from the one ``Settings`` class."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from catsdogs.cpus import available_cpus, cgroup_cpu_quota
from server import __version__
from server.__main__ import build_settings, parse_args
from server.settings import _SECRETS, MIN_TOKEN_CHARS, Settings, SettingsError
from server.settings_docs import END, START, help_line, markdown_table, replace_block, setting_docs
from server.settings_docs import main as settings_docs_main
from tests.serve.conftest import TINY_VERSION

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
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_quota(v1) == 2.0
    assert 1 <= available_cpus() <= len(__import__("os").sched_getaffinity(0))


# ---------------------------------------------------------------- one source: flags, --help, docs

ROOT = Path(__file__).resolve().parents[2]
FIELDS = dataclasses.fields(Settings)


def other_value(f: dataclasses.Field) -> object:
    """A valid value different from the field's default."""
    if f.name == "log_level":
        return "debug"
    if f.name == "intra_op_spinning":
        return 0  # 0, 1 or 2; the default is the largest
    if f.name == "adaptive_batch":
        return 0  # a switch, on by default
    if isinstance(f.default, str):
        return f.default + "x"
    return f.default + 1  # every other numeric setting accepts one more than its default


def test_every_setting_has_a_one_line_description():
    docs = {d.name: d for d in setting_docs()}
    assert list(docs) == [f.name for f in FIELDS]
    for f in FIELDS:
        text = f.metadata.get("help", "")
        assert text.strip(), f"{f.name} has no description"
        assert "\n" not in text, f.name
        assert len(text) <= 100, f.name
        assert docs[f.name].env == f.name.upper()


@pytest.mark.parametrize("f", [f for f in FIELDS if f.name not in _SECRETS], ids=lambda f: f.name)
def test_every_setting_has_a_typed_flag_that_beats_the_environment(f: dataclasses.Field):
    flag = "--" + f.name.replace("_", "-")
    value = other_value(f)
    env = {f.name.upper(): str(f.default)}
    settings = build_settings(parse_args([flag, str(value)]), env)
    assert getattr(settings, f.name) == value
    assert type(getattr(settings, f.name)) is type(f.default)
    assert build_settings(parse_args([]), env) == Settings.from_env(env)


def test_flags_parse_like_the_environment():
    args = parse_args(["--max-upload-bytes", "2_000", "--max-queue-delay-ms", "0.5"])
    assert (args.max_upload_bytes, args.max_queue_delay_ms) == (2000, 0.5)
    assert parse_args(["--model", "a.onnx"]).model_path == "a.onnx"  # the documented alias
    assert parse_args(["--model-path", "a.onnx"]).model_path == "a.onnx"
    for bad in (["--port", "eighty"], ["--max-queue-delay-ms", "nan"], ["--por", "80"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)  # a wrong type or a misspelt flag is a usage error, not a default
        assert exc.value.code == 2


def test_help_lists_every_setting_with_its_variable_and_default(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for d in setting_docs():
        if d.flags:
            assert " ".join(help_line(d).split()) in text, d.name
            assert all(flag in text for flag in d.flags)
    assert "--max-batch-size MAX_BATCH_SIZE most images per model run" in text
    assert "(env MAX_UPLOAD_BYTES, default 10485760 = 10 MiB)" in text
    assert "(env MODEL_URI, default empty)" in text


def test_the_secret_has_no_flag_and_is_never_shown(capsys: pytest.CaptureFixture):
    secret = "s3cret-token-value"
    settings = Settings.from_env({"API_TOKEN": secret})
    assert settings.api_token == secret
    assert secret not in repr(settings)
    for argv in (["--api-token", secret], [f"--api-token={secret}"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)  # a command line is readable by every local user
        assert exc.value.code == 2
        refused = capsys.readouterr()
        assert "--api-token: set API_TOKEN in the environment instead" in refused.err
        assert secret not in refused.out + refused.err
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = capsys.readouterr()
    assert "--api-token" not in shown.out
    assert "Environment only: API_TOKEN" in " ".join(shown.out.split())
    [row] = [line for line in markdown_table().splitlines() if "`API_TOKEN`" in line]
    assert row.startswith("| (environment only) | `API_TOKEN` | empty |")
    with pytest.raises(SettingsError) as exc:
        Settings.from_env({"API_TOKEN": "bad token " + secret})
    assert secret not in str(exc.value)


def test_the_previous_token_is_a_hidden_secret_that_needs_a_current_one():
    old, new = "old-Token.for-tests.1", "new-Token.for-tests.2"
    both = Settings.from_env({"API_TOKEN": new, "API_TOKEN_PREVIOUS": old})
    assert (both.api_token, both.api_token_previous) == (new, old)
    assert old not in repr(both)
    for env in (
        {"API_TOKEN_PREVIOUS": old},  # nothing to rotate from: no token is required at all
        {"API_TOKEN": new, "API_TOKEN_PREVIOUS": new},  # the same token twice
        {"API_TOKEN": new, "API_TOKEN_PREVIOUS": "has space " + old},
    ):
        with pytest.raises(SettingsError, match="API_TOKEN_PREVIOUS") as exc:
            Settings.from_env(env)
        assert old not in str(exc.value)
    with pytest.raises(SystemExit):
        parse_args(["--api-token-previous", old])


def test_the_example_secrets_placeholder_is_not_a_token():
    """Applied unedited, the prod overlay's example secrets set a token anyone can read."""
    example = ROOT / "deploy" / "k8s" / "overlays" / "prod" / "secrets.env.example"
    [placeholder] = [
        line.split("=", 1)[1] for line in example.read_text().splitlines()
        if line.startswith("API_TOKEN=")
    ]  # fmt: skip
    for env in (
        {"API_TOKEN": placeholder},
        {"API_TOKEN": "a-Real-one.for-tests.7", "API_TOKEN_PREVIOUS": placeholder},
    ):
        with pytest.raises(SettingsError, match="still the example's placeholder") as exc:
            Settings.from_env(env)
        assert placeholder not in str(exc.value)


def test_a_short_token_is_refused_by_name_without_showing_it(server_process):
    """A short bearer token is a guessable one (nothing limits how fast a client tries): the
    server does not start with one, names the setting, and never prints the token."""
    short = "Short.token-15c"
    assert len(short) == MIN_TOKEN_CHARS - 1
    for env in (
        {"API_TOKEN": short},
        {"API_TOKEN": "a-Real-one.for-tests.7", "API_TOKEN_PREVIOUS": short},
    ):
        with pytest.raises(SettingsError) as exc:
            Settings.from_env(env)
        assert f"shorter than {MIN_TOKEN_CHARS} characters" in str(exc.value)
        assert short not in str(exc.value)
    assert Settings.from_env({"API_TOKEN": short + "x"}).api_token == short + "x"
    server = server_process(API_TOKEN=short)
    server.proc.wait(timeout=30)
    assert server.proc.returncode == 2
    output = server.output()
    assert f"API_TOKEN: shorter than {MIN_TOKEN_CHARS} characters" in output
    assert short not in output


def test_readme_settings_table_is_the_generated_one():
    """The README's block is what `make docs-settings` writes: edit server/settings.py."""
    readme = (ROOT / "README.md").read_text()
    assert replace_block(readme, markdown_table()) == readme, "run `make docs-settings`"
    block = readme.split(START)[1].split(END)[0]
    assert block.count("\n| `--") + block.count("\n| (environment only)") == len(FIELDS)
    assert "| `--model-path`, `--model` | `MODEL_PATH` | `models/model.onnx` |" in block


def test_settings_docs_check_and_write(tmp_path: Path):
    doc = tmp_path / "README.md"
    doc.write_text(f"# x\n\n{START}\n| stale |\n{END}\n\nafter\n")
    assert settings_docs_main(["--check", str(doc)]) == 1
    assert settings_docs_main(["--write", str(doc)]) == 0
    assert settings_docs_main(["--check", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith(f"# x\n\n{START}\n| setting |")
    assert text.endswith(f"{END}\n\nafter\n")
    assert "| stale |" not in text


def run_version(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in {f.name.upper() for f in FIELDS}}
    return subprocess.run(
        [sys.executable, "-m", "server", "--version", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**clean, **env},
        check=False,
    )


def test_version_prints_server_and_model_versions(tiny_model: Path):
    out = run_version("--model", str(tiny_model))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"server {__version__}; model tiny_color {TINY_VERSION} ({tiny_model})\n"
    by_env = run_version(MODEL_PATH=str(tiny_model), PORT="1")  # the environment works too
    assert by_env.stdout == out.stdout


def test_version_without_a_readable_model_still_exits_0(tmp_path: Path):
    missing = tmp_path / "none.onnx"
    out = run_version("--model", str(missing))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"server {__version__}; model: none readable at {missing} (")
    assert out.stdout.count("\n") == 1
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    out = run_version("--model", str(broken))
    assert out.returncode == 0
    assert out.stdout.startswith(f"server {__version__}; model: none readable at {broken} (")
    out = run_version(MODEL_URI="models:/catsdogs@champion")
    assert out.returncode == 0
    assert "models:/catsdogs@champion is resolved at start" in out.stdout
