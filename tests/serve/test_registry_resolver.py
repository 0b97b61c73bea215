"""``models:/`` resolution against a registry that may be hostile.

A tiny fake of MLflow's REST API runs on 127.0.0.1 in a thread (the real one is exercised, slowly,
by tests/train/test_registry.py); each test makes it answer what an attacker or a broken store
could: paths that climb out of the cache, downloads without end, wrong checksums, foreign schemes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import TINY_VERSION

from catsdogs.modelfile import load_model_file
from server.model_uri import DEFAULT_MAX_BYTES, RegistryError, resolve_model_uri
from server.settings import Settings, SettingsError

pytestmark = pytest.mark.serve

RUN_DIR = "1/0123456789abcdef/artifacts/onnx"  # what export's source looks like under the proxy
SOURCE = f"mlflow-artifacts:/{RUN_DIR}"
FILE_URL = f"/api/2.0/mlflow-artifacts/artifacts/{RUN_DIR}/model.onnx"
MIB = 1024 * 1024


@dataclass
class FakeMlflow:
    """What the fake registry answers; tests change it before resolving."""

    model: bytes
    versions: dict[str, dict] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    # path -> handler(request) for anything a test wants to answer differently
    routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = field(default_factory=dict)
    listed_size: int | None = None  # None: the real size
    hits: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)  # bytes written by streaming routes
    authorization: list[str | None] = field(default_factory=list)  # each request's header
    url: str = ""

    def version(self, number: str = "1", *, source: str = SOURCE, **tags: str) -> dict:
        mv = {
            "name": "catsdogs",
            "version": number,
            "source": source,
            "run_id": "0123456789abcdef",
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        self.versions[number] = mv
        return mv


def _send(req: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
    req.send_response(status)
    req.send_header("Content-Type", ctype)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def _json(req: BaseHTTPRequestHandler, status: int, body: object) -> None:
    _send(req, status, json.dumps(body).encode(), "application/json")


def _not_found(req: BaseHTTPRequestHandler, what: str) -> None:
    _json(req, 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"{what} not found"})


def _handler(fake: FakeMlflow) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked answers need it

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest's output clean

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            fake.hits[url.path] = fake.hits.get(url.path, 0) + 1
            fake.authorization.append(self.headers.get("Authorization"))
            if url.path in fake.routes:
                fake.routes[url.path](self)
            elif url.path == "/api/2.0/mlflow/registered-models/alias":
                number = fake.aliases.get(query.get("alias", ""))
                if number is None:
                    _not_found(self, f"alias {query.get('alias')}")
                else:
                    _json(self, 200, {"model_version": fake.versions[number]})
            elif url.path == "/api/2.0/mlflow/model-versions/get":
                mv = fake.versions.get(query.get("version", ""))
                _json(self, 200, {"model_version": mv}) if mv else _not_found(self, "version")
            elif url.path == "/api/2.0/mlflow-artifacts/artifacts":
                size = len(fake.model) if fake.listed_size is None else fake.listed_size
                files = [{"path": "model.onnx", "is_dir": False, "file_size": size}]
                _json(self, 200, {"files": files} if query.get("path") == RUN_DIR else {})
            elif url.path == FILE_URL:
                _send(self, 200, fake.model, "application/octet-stream")
            else:
                _not_found(self, url.path)

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up mid-answer is what several tests provoke


@pytest.fixture
def registry(tiny_model: Path) -> Iterator[FakeMlflow]:
    fake = FakeMlflow(model=tiny_model.read_bytes())
    server = _QuietServer(("127.0.0.1", 0), _handler(fake))
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="fake-mlflow", daemon=True
    )
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def resolve(registry: FakeMlflow, cache: Path, uri: str = "models:/catsdogs@champion", **kw):
    return resolve_model_uri(uri, tracking_uri=registry.url, cache_dir=cache, **kw)


def _stream_zeros(fake: FakeMlflow, *, announce: int | None, limit: int = 64 * MIB):
    """A route that streams zeros (chunked, or after a Content-Length) until the client hangs up."""

    def route(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "application/octet-stream")
        if announce is None:
            req.send_header("Transfer-Encoding", "chunked")
        else:
            req.send_header("Content-Length", str(announce))
        req.end_headers()
        block = b"\0" * 65536
        sent = 0
        try:
            while sent < limit:
                if announce is None:
                    req.wfile.write(b"%x\r\n" % len(block) + block + b"\r\n")
                else:
                    req.wfile.write(block)
                sent += len(block)
        except OSError:
            pass  # the client stopped reading and closed: what we want
        finally:
            fake.sent[req.path] = sent
            req.close_connection = True

    return route


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


# ------------------------------------------------------------------ the happy path


def test_alias_resolves_downloads_checks_and_loads(registry: FakeMlflow, tmp_path: Path):
    digest = hashlib.sha256(registry.model).hexdigest()
    registry.version("3", sha256=digest)
    registry.aliases["champion"] = "3"
    cache = tmp_path / "cache"
    path = resolve(registry, cache)
    assert path == (cache / "catsdogs" / "3" / "model.onnx").resolve()
    assert path.read_bytes() == registry.model
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert load_model_file(path).contract.model_version == TINY_VERSION
    assert _leftovers(cache) == [path]  # no temp file left behind

    again = resolve(registry, cache)  # cached and still matching: not downloaded again
    assert again == path
    assert registry.hits[FILE_URL] == 1

    path.write_bytes(b"tampered")  # a damaged cache entry is replaced, never served
    assert resolve(registry, cache).read_bytes() == registry.model
    assert registry.hits[FILE_URL] == 2


def test_version_number_without_checksum_uses_the_listed_size(registry: FakeMlflow, tmp_path: Path):
    registry.version("2")
    path = resolve(registry, tmp_path, "models:/catsdogs/2")
    assert path.read_bytes() == registry.model


def test_settings_reach_the_resolver_through_the_app(registry: FakeMlflow, tmp_path: Path):
    from server.app import load_served_model

    registry.version("1", sha256=hashlib.sha256(registry.model).hexdigest())
    registry.aliases["champion"] = "1"
    base = Settings(
        model_uri="models:/catsdogs@champion",
        mlflow_tracking_uri=registry.url,
        model_cache_dir=str(tmp_path / "cache"),
        intra_op_threads=1,
    )
    model = load_served_model(base)
    assert model.contract.model_version == TINY_VERSION
    small = replace(base, model_max_bytes=100, model_cache_dir=str(tmp_path / "other"))
    with pytest.raises(RegistryError, match="over the limit of 100"):
        load_served_model(small)


def test_new_settings_are_validated():
    s = Settings.from_env({"MODEL_MAX_BYTES": "2_000_000", "MODEL_ALLOW_LOCAL_SOURCE": "1"})
    assert (s.model_max_bytes, s.model_allow_local_source) == (2_000_000, 1)
    assert Settings().model_max_bytes == DEFAULT_MAX_BYTES == 1024 * MIB
    assert Settings().model_allow_local_source == 0
    for name, value in [("MODEL_MAX_BYTES", "0"), ("MODEL_ALLOW_LOCAL_SOURCE", "2")]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


# ------------------------------------------------------------------ paths


@pytest.mark.parametrize("version", ["../../../outside", "1/../../x", "1.0", "", "-1"])
def test_a_version_that_is_not_a_number_is_refused(
    registry: FakeMlflow, tmp_path: Path, version: str
):
    registry.version("1")["version"] = version
    registry.aliases["champion"] = "1"
    cache = tmp_path / "cache"
    with pytest.raises(RegistryError, match="model version"):
        resolve(registry, cache)
    assert _leftovers(tmp_path) == []
    assert FILE_URL not in registry.hits


@pytest.mark.parametrize(
    ("uri", "field_name"),
    [
        ("models:/..@champion", "model name"),
        ("models:/.hidden/1", "model name"),
        ("models:/cats dogs/1", "model name"),
        ("models:/catsdogs@../../x", "expected models:/NAME"),
        ("models:/catsdogs@cham pion", "alias"),
        ("models:/catsdogs/1e3", "version"),
    ],
)
def test_names_in_the_uri_are_validated(
    registry: FakeMlflow, tmp_path: Path, uri: str, field_name: str
):
    with pytest.raises(RegistryError, match=field_name):
        resolve(registry, tmp_path, uri)
    assert registry.hits == {}  # refused before asking the registry


def test_a_version_other_than_the_one_asked_for_is_refused(registry: FakeMlflow, tmp_path: Path):
    registry.versions["2"] = registry.version("7")  # asked for 2, the registry says 7
    with pytest.raises(RegistryError, match="answered version 7"):
        resolve(registry, tmp_path, "models:/catsdogs/2")


def test_a_symlink_in_the_cache_is_not_followed(registry: FakeMlflow, tmp_path: Path):
    registry.version("1")
    registry.aliases["champion"] = "1"
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    cache.mkdir()
    outside.mkdir()
    (cache / "catsdogs").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RegistryError, match="symlink"):
        resolve(registry, cache)
    assert list(outside.iterdir()) == []
    (cache / "catsdogs").unlink()
    (cache / "catsdogs" / "1").mkdir(parents=True)
    (cache / "catsdogs" / "1" / "model.onnx").symlink_to(outside / "model.onnx")
    with pytest.raises(RegistryError, match="outside"):
        resolve(registry, cache)
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------------ size and integrity


def test_content_length_over_the_limit_is_refused_up_front(registry: FakeMlflow, tmp_path: Path):
    registry.version("1")
    registry.aliases["champion"] = "1"
    registry.listed_size = 1000  # the listing is small; the download announces 10 GiB
    registry.routes[FILE_URL] = _stream_zeros(registry, announce=10 << 30)
    start = time.monotonic()
    with pytest.raises(RegistryError, match=r"announces 10737418240 bytes, over the limit"):
        resolve(registry, tmp_path, max_bytes=MIB)
    assert time.monotonic() - start < 10
    assert _leftovers(tmp_path) == []


def test_chunked_download_is_cut_at_the_limit(registry: FakeMlflow, tmp_path: Path):
    registry.version("1")
    registry.aliases["champion"] = "1"
    registry.listed_size = 1000
    registry.routes[FILE_URL] = _stream_zeros(registry, announce=None)
    with pytest.raises(RegistryError, match="over the limit of 1048576 bytes"):
        resolve(registry, tmp_path, max_bytes=MIB)
    assert _leftovers(tmp_path) == []  # the partial file is gone
    deadline = time.monotonic() + 10
    while FILE_URL not in registry.sent and time.monotonic() < deadline:
        time.sleep(0.05)
    # the client hung up soon after 1 MiB: the fake could not push its 64 MiB through
    assert registry.sent[FILE_URL] < 32 * MIB


def test_a_listed_size_over_the_limit_is_refused_before_downloading(
    registry: FakeMlflow, tmp_path: Path
):
    registry.version("1")
    registry.aliases["champion"] = "1"
    registry.listed_size = 5 << 30
    with pytest.raises(RegistryError, match="5368709120 bytes, over the limit"):
        resolve(registry, tmp_path)
    assert FILE_URL not in registry.hits


def test_checksum_mismatch_is_refused_and_removed(registry: FakeMlflow, tmp_path: Path):
    registry.version("1", sha256=hashlib.sha256(b"another model").hexdigest())
    registry.aliases["champion"] = "1"
    cache = tmp_path / "cache"
    with pytest.raises(RegistryError, match="sha256 differs"):
        resolve(registry, cache)
    assert _leftovers(cache) == []
    assert registry.hits[FILE_URL] == 1


def test_size_mismatch_with_the_listing_is_refused(registry: FakeMlflow, tmp_path: Path):
    registry.version("1")
    registry.aliases["champion"] = "1"
    registry.listed_size = len(registry.model) + 1
    with pytest.raises(RegistryError, match="the registry lists"):
        resolve(registry, tmp_path)
    assert _leftovers(tmp_path) == []


def test_a_malformed_checksum_tag_is_refused(registry: FakeMlflow, tmp_path: Path):
    registry.version("1", sha256="not-a-hash")
    registry.aliases["champion"] = "1"
    with pytest.raises(RegistryError, match="is not a sha256"):
        resolve(registry, tmp_path)


def test_a_file_missing_from_the_listing_is_refused(registry: FakeMlflow, tmp_path: Path):
    registry.version("1", source="mlflow-artifacts:/1/other/artifacts/onnx")
    registry.aliases["champion"] = "1"
    with pytest.raises(RegistryError, match="not in the version's artifact listing"):
        resolve(registry, tmp_path)


# ------------------------------------------------------------------ schemes


def test_file_source_refused_by_default_and_accepted_when_allowed(
    registry: FakeMlflow, tmp_path: Path, tiny_model: Path
):
    folder = tmp_path / "artifacts"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(tiny_model.read_bytes())
    digest = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    registry.version("1", source=folder.as_uri(), sha256=digest)
    registry.version("2", source=str(folder / "model.onnx"))
    registry.aliases.update(champion="1", challenger="2")
    for alias, scheme in (("champion", "'file'"), ("challenger", "'absolute path'")):
        with pytest.raises(RegistryError, match=f"source scheme {scheme} is not allowed"):
            resolve(registry, tmp_path, f"models:/catsdogs@{alias}")
    path = resolve(registry, tmp_path, allow_local_source=True)
    assert path == folder / "model.onnx"
    assert load_model_file(path).contract.model_version == TINY_VERSION
    assert resolve(registry, tmp_path, "models:/catsdogs@challenger", allow_local_source=True)

    registry.version("3", source=folder.as_uri(), sha256="0" * 64)
    with pytest.raises(RegistryError, match="sha256 differs"):
        resolve(registry, tmp_path, "models:/catsdogs/3", allow_local_source=True)


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("s3://bucket/1/run/artifacts/onnx", "'s3'"),
        ("gs://bucket/onnx", "'gs'"),
        ("ftp://127.0.0.1/onnx", "'ftp'"),
        ("hdfs:///models/onnx", "'hdfs'"),
        ("../../etc/onnx", "'relative path'"),
        ("onnx/model.onnx", "'relative path'"),
        ("https://evil.example/onnx", "'https' on another server"),
        ("http://127.0.0.1:1/onnx", "'http' on another server"),
    ],
)
def test_foreign_schemes_are_refused(registry: FakeMlflow, tmp_path: Path, source: str, shown: str):
    registry.version("1", source=source)
    registry.aliases["champion"] = "1"
    with pytest.raises(RegistryError, match=f"source scheme {shown}"):
        resolve(registry, tmp_path, allow_local_source=True)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "source",
    [
        "mlflow-artifacts:/1/run/../../../etc/onnx",
        "mlflow-artifacts:/1/run/%2e%2e/%2e%2e/onnx",
        "runs:/0123/../../onnx",
    ],
)
def test_dot_dot_in_an_artifact_path_is_refused(registry: FakeMlflow, tmp_path: Path, source):
    registry.version("1", source=source)
    registry.aliases["champion"] = "1"
    with pytest.raises(RegistryError, match="is not a plain path"):
        resolve(registry, tmp_path)


def test_http_source_on_the_tracking_server_goes_through_the_proxy(
    registry: FakeMlflow, tmp_path: Path
):
    registry.version("1", source=f"{registry.url}/api/2.0/mlflow-artifacts/artifacts/{RUN_DIR}")
    registry.aliases["champion"] = "1"
    assert resolve(registry, tmp_path).read_bytes() == registry.model
    assert registry.hits["/api/2.0/mlflow-artifacts/artifacts"] == 1  # its size was checked


def test_a_redirect_to_another_server_is_not_followed(registry: FakeMlflow, tmp_path: Path):
    def redirect(req: BaseHTTPRequestHandler) -> None:
        req.send_response(302)
        req.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        req.send_header("Content-Length", "0")
        req.end_headers()

    registry.version("1")
    registry.aliases["champion"] = "1"
    registry.routes[FILE_URL] = redirect
    with pytest.raises(RegistryError, match="redirects to another server"):
        resolve(registry, tmp_path)


def test_operator_uri_with_a_foreign_scheme_is_refused(tmp_path: Path, tiny_model: Path):
    with pytest.raises(RegistryError, match="MODEL_URI scheme 's3'"):
        resolve_model_uri("s3://bucket/model.onnx", tracking_uri="", cache_dir=tmp_path)
    # the operator's own path or file: URI stays as it is (same as MODEL_PATH)
    assert resolve_model_uri(str(tiny_model), tracking_uri="", cache_dir=tmp_path) == tiny_model
    uri = tiny_model.as_uri()
    assert resolve_model_uri(uri, tracking_uri="", cache_dir=tmp_path) == tiny_model


# ------------------------------------------------------------------ what errors show


def test_errors_never_echo_a_huge_registry_body(registry: FakeMlflow, tmp_path: Path):
    huge = "A" * 200_000

    def shout(req: BaseHTTPRequestHandler) -> None:
        _json(req, 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": huge})

    registry.routes["/api/2.0/mlflow/registered-models/alias"] = shout
    with pytest.raises(RegistryError, match="answered 404") as info:
        resolve(registry, tmp_path)
    assert len(str(info.value)) < 600

    registry.version("1", source="s3://" + "b" * 100_000)
    with pytest.raises(RegistryError, match="'s3'") as info:
        resolve(registry, tmp_path, "models:/catsdogs/1")
    assert len(str(info.value)) < 600


def test_an_oversized_registry_answer_is_refused(registry: FakeMlflow, tmp_path: Path):
    def flood(req: BaseHTTPRequestHandler) -> None:
        _send(req, 200, b'{"x": "' + b"A" * (2 * MIB) + b'"}', "application/json")

    registry.routes["/api/2.0/mlflow/registered-models/alias"] = flood
    with pytest.raises(RegistryError, match="answer over 1048576 bytes"):
        resolve(registry, tmp_path)


def test_a_registry_answer_that_trickles_in_is_cut_at_its_deadline(
    registry: FakeMlflow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Each read had a timeout, the answer none: a server sending a byte now and then held the
    start for as long as it liked (days, at 1 byte/s up to the 1 MiB cap)."""
    from server import model_uri

    monkeypatch.setattr(model_uri, "_JSON_DEADLINE_S", 1.0)
    stop = threading.Event()

    def trickle(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(1 << 20))
        req.end_headers()
        with contextlib.suppress(OSError):
            while not stop.wait(0.1):
                req.wfile.write(b" ")
                req.wfile.flush()

    registry.routes["/api/2.0/mlflow/registered-models/alias"] = trickle
    started = time.monotonic()
    try:
        with pytest.raises(RegistryError, match="the answer took over 1 s"):
            resolve(registry, tmp_path)
    finally:
        stop.set()
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("env", "header"),
    [
        ({}, None),
        (
            {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cret"},
            "Basic YWxpY2U6czNjcmV0",
        ),
        ({"MLFLOW_TRACKING_TOKEN": "t0ken", "MLFLOW_TRACKING_USERNAME": "alice"}, "Bearer t0ken"),
    ],
)
def test_mlflow_credentials_come_from_its_environment_variables(
    registry: FakeMlflow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env, header
):
    """A tracking server with authentication: the server sent no credentials at all, and a
    user:password@ in MLFLOW_TRACKING_URI did not work and was echoed in every error."""
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    registry.version("3", sha256=hashlib.sha256(registry.model).hexdigest())
    registry.aliases["champion"] = "3"
    assert resolve(registry, tmp_path).is_file()
    assert len(registry.authorization) >= 3  # the alias, the listing, the file
    assert set(registry.authorization) == {header}


def test_credentials_in_the_tracking_uri_are_refused_unshown(registry: FakeMlflow, tmp_path: Path):
    host = registry.url.removeprefix("http://")
    with pytest.raises(RegistryError, match="MLFLOW_TRACKING_USERNAME") as caught:
        resolve_model_uri(
            "models:/catsdogs@champion",
            tracking_uri=f"http://alice:s3cret@{host}",
            cache_dir=tmp_path / "cache",
        )
    assert "s3cret" not in str(caught.value)
    assert registry.authorization == []  # nothing was sent


def test_unknown_alias_names_the_registry_message(registry: FakeMlflow, tmp_path: Path):
    with pytest.raises(RegistryError, match="alias nobody not found"):
        resolve(registry, tmp_path, "models:/catsdogs@nobody")


# ------------------------------------------------------------------ the real server process


@pytest.mark.slow
def test_server_process_serves_a_registry_version(registry: FakeMlflow, server_process, tmp_path):
    registry.version("1", sha256=hashlib.sha256(registry.model).hexdigest())
    registry.aliases["champion"] = "1"
    server = server_process(
        MODEL_URI="models:/catsdogs@champion",
        MLFLOW_TRACKING_URI=registry.url,
        MODEL_CACHE_DIR=str(tmp_path / "cache"),
    )
    server.wait_ready()
    import httpx

    meta = httpx.get(f"{server.url}/metadata", timeout=10).json()
    assert meta["model_version"] == TINY_VERSION
    assert (tmp_path / "cache" / "catsdogs" / "1" / "model.onnx").is_file()
    assert os.path.getsize(tmp_path / "cache" / "catsdogs" / "1" / "model.onnx") == len(
        registry.model
    )
