"""Where a served model comes from: a local ``.onnx`` path or the MLflow model registry.

``resolve_model_uri`` turns ``models:/catsdogs@champion`` or ``models:/catsdogs/3`` into a local
file through MLflow's REST API, with nothing but the standard library (the serving environment
has no mlflow). Opening the file is ``catsdogs.modelfile.load_model_file``'s job.

Registry layout written by ``export``: each version's ``source`` is an artifact folder holding
``model.onnx`` (or a path that ends in ``.onnx`` itself).

The registry is not trusted. What it answers is checked before it touches the disk:

- names, aliases and versions must match strict patterns; the cache path is built from them
  alone and must resolve inside the cache folder (no ``..``, no symlink leading out);
- a version's ``source`` must use one of these schemes, anything else is refused:

  ============================  ==========================================================
  ``mlflow-artifacts:``         fetched through the tracking server's artifact proxy
  ``runs:``                     fetched through the tracking server (``/get-artifact``)
  ``http:`` / ``https:``        only on the tracking server itself (same scheme, host, port)
  ``file:`` / absolute path     only with ``allow_local_source`` (``MODEL_ALLOW_LOCAL_SOURCE=1``)
  ============================  ==========================================================

- a download is streamed with a byte limit (``max_bytes``, ``MODEL_MAX_BYTES``), refused up
  front when ``Content-Length`` is over it, and never follows a redirect to another origin;
- the file must have the size the artifact listing gives, and the sha256 of the version's
  ``sha256`` tag when it has one. A file that fails a check is removed, never served.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catsdogs.hashing import file_sha256

MODEL_FILE_NAME = "model.onnx"  # the file inside a registered version's artifact folder
SHA256_TAG = "sha256"  # a model-version tag holding the hex sha256 of the ONNX file
DEFAULT_MAX_BYTES = 1 << 30
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # never "." or ".."
_ALIAS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")
_VERSION = re.compile(r"[0-9]{1,10}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TIMEOUT_S = 30.0  # per socket operation
_JSON_DEADLINE_S = 60.0  # a registry answer (JSON, at most _MAX_JSON_BYTES) arrives whole within
_DOWNLOAD_DEADLINE_S = 900.0  # a whole download, so a server dripping bytes cannot hold start-up
_MAX_JSON_BYTES = 1 << 20  # registry answers are small; a bigger one is refused unread
_CHUNK = 1 << 20
_SHOWN_CHARS = 200  # registry text quoted in an error is cut to this


class RegistryError(RuntimeError):
    """A ``models:/`` URI could not be turned into a local model file."""


@dataclass(frozen=True)
class _Remote:
    """A version's file on the tracking server: where to get it, where its size is listed."""

    url: str
    listing_url: str | None  # a directory listing carrying ``file_size``; None = not known
    listed_name: str  # the entry in that listing (run-relative for runs:, else the basename)


@dataclass(frozen=True)
class _Expected:
    size: int | None
    sha256: str | None


# ---------------------------------------------------------------- registry


def _short(text: object) -> str:
    """Registry text for an error message: one line, printable, cut short."""
    flat = "".join(c if c.isprintable() else " " for c in str(text))
    return flat if len(flat) <= _SHOWN_CHARS else flat[:_SHOWN_CHARS] + "..."


def _checked(field: str, value: object, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise RegistryError(f"registry {field} is not a string: {_short(value)!r}")
    text = str(value)
    if pattern.fullmatch(text) is None:
        raise RegistryError(f"invalid {field} {_short(text)!r}: expected {pattern.pattern}")
    return text


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the tracking server (scheme, host and port unchanged)."""

    def __init__(self, origin: tuple[str, str]) -> None:
        self.origin = origin

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        target = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        if (target.scheme, target.netloc) != self.origin:
            raise RegistryError(f"{_short(req.full_url)} redirects to another server, refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _authorization(environ: Mapping[str, str]) -> str | None:
    """The Authorization header MLflow's own client sends, from its environment variables:
    ``MLFLOW_TRACKING_TOKEN`` (bearer), else ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` (basic, as MLflow's authentication app expects)."""
    token = environ.get("MLFLOW_TRACKING_TOKEN", "")
    if token:
        return f"Bearer {token}"
    user = environ.get("MLFLOW_TRACKING_USERNAME", "")
    if user:
        pair = f"{user}:{environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        return f"Basic {base64.b64encode(pair).decode('ascii')}"
    return None


class _Client:
    """HTTP to one tracking server, with bounded answers and errors that never echo much.
    Credentials go only to it: redirects stay on its origin (``_SameOriginRedirects``)."""

    def __init__(self, base: str, authorization: str | None = None) -> None:
        parts = urllib.parse.urlsplit(base)
        if parts.username is not None or parts.password is not None:
            # urllib takes user:password@ for part of the host, and every error would show it
            raise RegistryError(
                "MLFLOW_TRACKING_URI carries credentials; set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
            )
        self.base = base
        self.origin = (parts.scheme, parts.netloc)
        self._opener = urllib.request.build_opener(_SameOriginRedirects(self.origin))
        self._headers = {"Authorization": authorization} if authorization else {}

    def open(self, url: str) -> Any:
        try:
            request = urllib.request.Request(url, headers=self._headers)
            return self._opener.open(request, timeout=_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            detail = ""
            with contextlib.suppress(OSError, http.client.HTTPException):
                detail = exc.read(2048).decode("utf-8", "replace")  # the start is enough
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["message"]  # MLflow: {"error_code", "message"}
            raise RegistryError(f"GET {_short(url)} answered {exc.code}: {_short(detail)}") from exc
        except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
            raise RegistryError(f"GET {_short(url)} failed: {_short(exc)}") from exc

    def get_json(self, url: str) -> dict[str, Any]:
        # a deadline for the whole answer: _TIMEOUT_S bounds each read only, so a server that
        # sent a byte a second held the start for days (the 1 MiB cap at 1 B/s)
        deadline = time.monotonic() + _JSON_DEADLINE_S
        pieces: list[bytes] = []
        size = 0
        with self.open(url) as resp:
            try:
                while size <= _MAX_JSON_BYTES and (chunk := resp.read1(_MAX_JSON_BYTES + 1 - size)):
                    pieces.append(chunk)
                    size += len(chunk)
                    if time.monotonic() > deadline:
                        raise RegistryError(
                            f"GET {_short(url)}: the answer took over {_JSON_DEADLINE_S:.0f} s"
                        )
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                raise RegistryError(f"GET {_short(url)} failed: {_short(exc)}") from exc
        raw = b"".join(pieces)
        if len(raw) > _MAX_JSON_BYTES:
            raise RegistryError(f"GET {_short(url)}: answer over {_MAX_JSON_BYTES} bytes, refused")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise RegistryError(f"GET {_short(url)}: the answer is not JSON") from exc
        if not isinstance(body, dict):
            raise RegistryError(f"GET {_short(url)}: the answer is not a JSON object")
        return body


def _model_version(
    client: _Client, name: str, alias: str | None, version: str | None
) -> dict[str, Any]:
    api = f"{client.base}/api/2.0/mlflow"
    if alias is not None:
        query = urllib.parse.urlencode({"name": name, "alias": alias})
        body = client.get_json(f"{api}/registered-models/alias?{query}")
    else:
        query = urllib.parse.urlencode({"name": name, "version": version})
        body = client.get_json(f"{api}/model-versions/get?{query}")
    mv = body.get("model_version")
    if not isinstance(mv, dict) or not isinstance(mv.get("source"), str):
        raise RegistryError(f"registry answer for models:/{name} lacks model_version.source")
    if mv.get("name", name) != name:
        raise RegistryError(f"registry answered for model {_short(mv['name'])!r}, not {name!r}")
    got = _checked("model version", mv.get("version"), _VERSION)
    if version is not None and int(got) != int(version):
        raise RegistryError(f"registry answered version {got} for models:/{name}/{version}")
    return mv


def _tag_sha256(mv: dict[str, Any]) -> str | None:
    """The version's ``sha256`` tag (REST shape: ``[{"key", "value"}]``), checked; else None."""
    tags = mv.get("tags") or []
    if isinstance(tags, dict):  # tolerate the {key: value} shape too
        tags = [{"key": k, "value": v} for k, v in tags.items()]
    for tag in tags if isinstance(tags, list) else []:
        if isinstance(tag, dict) and tag.get("key") == SHA256_TAG:
            value = str(tag.get("value", "")).strip().lower()
            if _SHA256.fullmatch(value) is None:
                raise RegistryError(
                    f"version tag {SHA256_TAG!r} is not a sha256: {_short(value)!r}"
                )
            return value
    return None


def _artifact_path(path: str, scheme: str) -> list[str]:
    """The segments of an artifact path; refuses ``..``, ``.``, empty and odd segments."""
    decoded = urllib.parse.unquote(path).strip("/")
    segments = decoded.split("/")
    for seg in segments:
        if seg in ("", ".", "..") or "\\" in seg or not seg.isprintable():
            raise RegistryError(f"{scheme}: source path {_short(path)!r} is not a plain path")
    return segments


def _quote(segments: list[str]) -> str:
    return "/".join(urllib.parse.quote(s, safe="") for s in segments)


def _with_file(segments: list[str]) -> list[str]:
    """A source naming the .onnx file itself, or its folder (then ``model.onnx`` inside)."""
    return segments if segments[-1].endswith(".onnx") else [*segments, MODEL_FILE_NAME]


def _proxied(base: str, segments: list[str]) -> _Remote:
    """A file under the tracking server's ``mlflow-artifacts`` proxy, and its listing."""
    file_segs = _with_file(segments)
    query = urllib.parse.urlencode({"path": "/".join(file_segs[:-1])})
    return _Remote(
        url=f"{base}/api/2.0/mlflow-artifacts/artifacts/{_quote(file_segs)}",
        listing_url=f"{base}/api/2.0/mlflow-artifacts/artifacts?{query}",
        listed_name=file_segs[-1],
    )


_PROXY_PREFIX = "/api/2.0/mlflow-artifacts/artifacts/"
_ALLOWED = (
    "mlflow-artifacts, runs, http(s) on the tracking server; "
    "file and absolute paths only with MODEL_ALLOW_LOCAL_SOURCE=1"
)


def _source_target(client: _Client, source: str, allow_local: bool) -> _Remote | Path:
    """Where the version's ONNX file is: a URL on the tracking server, or a local path."""
    parsed = urllib.parse.urlsplit(source)
    scheme = parsed.scheme.lower()
    if scheme == "mlflow-artifacts":
        # mlflow-artifacts:/1/<run>/artifacts/onnx (a host in it is ignored: we only ever ask
        # the tracking server we were given)
        return _proxied(client.base, _artifact_path(parsed.path, scheme))
    if scheme == "runs":
        segments = _artifact_path(f"{parsed.netloc}/{parsed.path}", scheme)
        run_id, rel = segments[0], _with_file(segments[1:] or [MODEL_FILE_NAME])
        query = urllib.parse.urlencode({"run_uuid": run_id, "path": "/".join(rel)})
        listing = urllib.parse.urlencode({"run_id": run_id, "path": "/".join(rel[:-1])})
        return _Remote(
            url=f"{client.base}/get-artifact?{query}",
            listing_url=f"{client.base}/api/2.0/mlflow/artifacts/list?{listing}",
            listed_name="/".join(rel),
        )
    if scheme in ("http", "https"):
        if (scheme, parsed.netloc) != client.origin:
            raise RegistryError(
                f"source scheme {scheme!r} on another server ({_short(parsed.netloc)!r}) is "
                f"not allowed (allowed: {_ALLOWED})"
            )
        prefix = urllib.parse.urlsplit(client.base).path.rstrip("/") + _PROXY_PREFIX
        if parsed.path.startswith(prefix) and not parsed.query:
            return _proxied(client.base, _artifact_path(parsed.path[len(prefix) :], scheme))
        segments = _with_file(_artifact_path(parsed.path, scheme))
        url = urllib.parse.urlunsplit((scheme, parsed.netloc, "/" + _quote(segments), "", ""))
        return _Remote(url=url, listing_url=None, listed_name=segments[-1])
    if scheme == "file" or (scheme == "" and source.startswith("/")):
        if not allow_local:
            raise RegistryError(
                f"source scheme {scheme or 'absolute path'!r} is not allowed: set "
                "MODEL_ALLOW_LOCAL_SOURCE=1 to serve a registry version from local disk"
            )
        if parsed.netloc not in ("", "localhost"):
            raise RegistryError(f"file: source on host {_short(parsed.netloc)!r} is not allowed")
        path = parsed.path if scheme == "file" else source
        return Path("/" + "/".join(_with_file(_artifact_path(path, scheme or "path"))))
    raise RegistryError(
        f"source scheme {(scheme or 'relative path')!r} is not allowed (allowed: {_ALLOWED}): "
        f"{_short(source)!r}"
    )


def _listed_size(client: _Client, remote: _Remote) -> int | None:
    """The file's size from the artifact listing (``file_size``); None when none is listed."""
    if remote.listing_url is None:
        return None
    body = client.get_json(remote.listing_url)
    for entry in body.get("files") or []:
        if not isinstance(entry, dict):
            continue
        path = str(entry.get("path", ""))
        if path == remote.listed_name or path.rsplit("/", 1)[-1] == remote.listed_name:
            if entry.get("is_dir"):
                break
            size = entry.get("file_size")
            if isinstance(size, int | str) and str(size).isdigit():
                return int(size)
            raise RegistryError(f"artifact listing gives no valid file_size for {path!r}")
    raise RegistryError(f"{remote.listed_name!r} is not in the version's artifact listing")


def _cache_path(cache_dir: Path, name: str, version: str) -> Path:
    """``cache_dir/NAME/VERSION/model.onnx``, created without leaving the cache folder.

    Each folder is checked before it is used, so a symlink planted in the cache cannot make
    the download write (or a later start read) anywhere else.
    """
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    folder = root
    for part in (name, version):
        folder = folder / part
        if folder.is_symlink():
            raise RegistryError(f"model cache {folder} is a symlink, refused")
        folder.mkdir(exist_ok=True)
    dest = folder / MODEL_FILE_NAME
    if dest.is_symlink() or not dest.resolve().is_relative_to(root):
        raise RegistryError(f"model cache {dest} leads outside {root}, refused")
    return dest


def _verify_file(path: Path, expected: _Expected, max_bytes: int, what: str) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise RegistryError(f"{what} is {size} bytes, over the limit of {max_bytes}")
    if expected.size is not None and size != expected.size:
        raise RegistryError(f"{what} is {size} bytes; the registry lists {expected.size}")
    if expected.sha256 is not None and file_sha256(path) != expected.sha256:
        raise RegistryError(f"{what}: sha256 differs from the version's {SHA256_TAG!r} tag")


def _download(client: _Client, url: str, dest: Path, expected: _Expected, max_bytes: int) -> None:
    """Stream ``url`` to a temp file beside ``dest``, check it, then rename it into place.

    A half-written or failed file never has the final name, and is removed.
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, client.open(url) as resp:
            announced = (resp.headers.get("Content-Length") or "").strip()
            if announced.isdigit() and int(announced) > max_bytes:
                raise RegistryError(
                    f"download {_short(url)} announces {int(announced)} bytes, over the "
                    f"limit of {max_bytes} (MODEL_MAX_BYTES)"
                )
            _copy_bounded(resp, out, url, max_bytes)
            out.flush()
            os.fsync(out.fileno())
        _verify_file(Path(tmp), expected, max_bytes, f"download {_short(url)}")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, dest)
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise RegistryError(f"download {_short(url)} failed: {_short(exc)}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _copy_bounded(resp: Any, out: Any, url: str, max_bytes: int) -> None:
    """Copy at most ``max_bytes``; one byte more, or a stalled transfer, is an error."""
    deadline = time.monotonic() + _DOWNLOAD_DEADLINE_S
    total = 0
    # read1: return what has arrived, so the deadline is checked even on a slow stream
    while chunk := resp.read1(_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise RegistryError(
                f"download {_short(url)} is over the limit of {max_bytes} bytes (MODEL_MAX_BYTES)"
            )
        if time.monotonic() > deadline:
            raise RegistryError(f"download {_short(url)} took over {_DOWNLOAD_DEADLINE_S:.0f} s")
        out.write(chunk)


def _local_uri(uri: str) -> Path:
    """An operator's own MODEL_URI that is not ``models:/``: a path or a ``file:`` URI."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme:
        raise RegistryError(
            f"MODEL_URI scheme {parsed.scheme!r} is not supported: use models:/NAME@ALIAS, "
            "models:/NAME/VERSION, a file: URI or a path"
        )
    return Path(uri)


def resolve_model_uri(
    uri: str,
    *,
    tracking_uri: str,
    cache_dir: Path,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_local_source: bool = False,
) -> Path:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> a local ONNX file.

    Anything else is the operator's own path (``file:`` URIs included) and returned as it is.
    Downloads land in ``cache_dir/NAME/VERSION/model.onnx``; a version's files never change, so
    a cached file is reused once it passes the same size and sha256 checks as a download. The
    alias is resolved on every call, so a promotion is picked up on the next start.
    """
    match = _MODELS_URI.match(uri)
    if match is None:
        if uri.startswith("models:"):
            raise RegistryError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return _local_uri(uri)
    name = _checked("model name", match["name"], _NAME)
    alias = None if match["alias"] is None else _checked("alias", match["alias"], _ALIAS)
    version = None if match["version"] is None else _checked("version", match["version"], _VERSION)
    if not tracking_uri.startswith(("http://", "https://")):
        raise RegistryError(
            f"{uri!r} needs an MLflow tracking server (http://...), got tracking URI "
            f"{tracking_uri!r}"
        )
    client = _Client(tracking_uri.rstrip("/"), _authorization(os.environ))
    mv = _model_version(client, name, alias, version)
    version = str(mv["version"])
    target = _source_target(client, mv["source"], allow_local_source)
    sha256 = _tag_sha256(mv)
    if isinstance(target, Path):
        if not target.is_file():
            raise RegistryError(f"{uri!r} -> version {version}: no file at {target}")
        _verify_file(target, _Expected(None, sha256), max_bytes, f"version {version} {target}")
        return target
    expected = _Expected(_listed_size(client, target), sha256)
    if expected.size is not None and expected.size > max_bytes:
        raise RegistryError(
            f"version {version} is {expected.size} bytes, over the limit of {max_bytes} "
            "(MODEL_MAX_BYTES)"
        )
    dest = _cache_path(cache_dir, name, version)
    if dest.is_file():
        try:
            _verify_file(dest, expected, max_bytes, f"cached {dest}")
            return dest
        except RegistryError:
            dest.unlink()  # damaged or stale: fetch it again
    _download(client, target.url, dest, expected, max_bytes)
    return dest
