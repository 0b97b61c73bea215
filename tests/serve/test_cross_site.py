"""Requests a web page makes a browser send: DNS rebinding and cross-site posts, on real servers.

A page on any site can post a form to a server its visitor reaches (no CORS preflight for a
form), and a page whose own name was made to resolve to 127.0.0.1 reaches a local server under
that name, reads its answers and posts feedback. Without API_TOKEN (``make serve``) both went
through: a rebinding page posted feedback that poisoned live accuracy.
"""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import BLUE, image_bytes

pytestmark = [pytest.mark.serve, pytest.mark.slow]

EVIL = "rebind.attacker.example"


def _code(response: httpx.Response) -> str:
    error = response.json()["error"]
    return error["code"] if isinstance(error, dict) else error


def test_a_loopback_server_answers_only_to_loopback_names_and_its_own_pages(server_process):
    server = server_process()
    server.wait_ready()
    url = server.url
    port = url.rsplit(":", 1)[1]
    photo = {"content": image_bytes(BLUE), "headers": {"content-type": "image/jpeg"}}
    answer = httpx.post(f"{url}/predict", **photo).json()

    # a page whose name resolves to 127.0.0.1: nothing but the probes answers it
    rebound = {"host": f"{EVIL}:{port}", "origin": f"http://{EVIL}:{port}"}
    for method, path, body in [
        ("GET", "/metadata", None),
        ("GET", "/monitoring/summary", None),
        ("POST", "/feedback", {"prediction_id": answer["prediction_id"], "label": "cat"}),
        ("POST", "/v2/models/catsdogs/infer", {"inputs": []}),
    ]:
        r = httpx.request(method, f"{url}{path}", json=body, headers=rebound)
        assert r.status_code == 400, (path, r.text)
        assert "Host header" in r.text, path
        assert r.headers["x-request-id"], path
    assert _code(httpx.get(f"{url}/metadata", headers=rebound)) == "invalid_host"
    assert _code(httpx.post(f"{url}/v2/models/catsdogs/infer", headers=rebound)).startswith(
        "the Host header"
    )  # the V2 routes' own error shape
    for path in ("/health", "/health/live", "/health/ready", "/v2/health/ready"):
        assert httpx.get(f"{url}{path}", headers={"host": EVIL}).status_code == 200, path
    # the loopback names, with or without a port, in any case
    for host in (f"127.0.0.1:{port}", f"LocalHost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(f"{url}/metadata", headers={"host": host}).status_code == 200, host

    # another site's page posting a form or JSON here: its Origin is not this server
    cross = {"origin": "http://attacker.example"}
    r = httpx.post(f"{url}/predict", **{**photo, "headers": {**photo["headers"], **cross}})
    assert (r.status_code, _code(r)) == (403, "cross_origin")
    feedback = {"prediction_id": answer["prediction_id"], "label": "cat"}
    r = httpx.post(f"{url}/feedback", json=feedback, headers=cross)
    assert (r.status_code, _code(r)) == (403, "cross_origin")
    r = httpx.post(f"{url}/feedback", json=feedback, headers={"origin": "null"})
    assert (r.status_code, _code(r)) == (403, "cross_origin")  # a sandboxed page or a file
    assert httpx.get(f"{url}/metadata", headers=cross).status_code == 200  # reading is not
    # the server's own page (same origin) and service clients (no Origin) post as before
    own = {"origin": f"http://127.0.0.1:{port}"}
    r = httpx.post(f"{url}/predict", **{**photo, "headers": {**photo["headers"], **own}})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/feedback", json=feedback)
    assert r.status_code == 201, r.text
    summary = httpx.get(f"{url}/monitoring/summary").json()["model_versions"]["tiny-1"]
    assert summary["confusion"] == {"cat": {"dog": 1}}  # the one label that came in

    # refused before the app: counted on the unmatched route, one access line each, no error
    text = httpx.get(f"{url}/metrics").text
    assert 'route="<unmatched>",status="400"' in text
    assert 'route="<unmatched>",status="403"' in text
    records = [json.loads(x) for x in server.output(10**9).splitlines() if x.startswith("{")]
    assert not [r for r in records if r.get("level") == "error"]


def test_allowed_hosts_names_the_hosts_any_connection_may_use(server_process):
    """ALLOWED_HOSTS set: those names on every connection (a proxy's public name); '*': any."""
    named = server_process(ALLOWED_HOSTS="api.example.com, 127.0.0.1")
    anything = server_process(ALLOWED_HOSTS="*")
    named.wait_ready()
    anything.wait_ready()
    for host, status in [
        ("api.example.com", 200),
        ("API.example.com:8443", 200),
        ("127.0.0.1", 200),
        ("localhost", 400),
        (EVIL, 400),
    ]:
        r = httpx.get(f"{named.url}/metadata", headers={"host": host})
        assert r.status_code == status, (host, r.text)
    assert httpx.get(f"{named.url}/health/ready", headers={"host": EVIL}).status_code == 200
    assert httpx.get(f"{anything.url}/metadata", headers={"host": EVIL}).status_code == 200
    # the Origin rule holds whatever the hosts
    r = httpx.post(
        f"{anything.url}/feedback",
        json={"prediction_id": "x", "label": "cat"},
        headers={"host": EVIL, "origin": "http://attacker.example"},
    )
    assert (r.status_code, _code(r)) == (403, "cross_origin")
    # behind a proxy that rewrites Host, the page's public origin is one of the listed names
    proxied = {"host": "127.0.0.1", "origin": "https://api.example.com"}
    r = httpx.post(
        f"{named.url}/feedback", json={"prediction_id": "x", "label": "cat"}, headers=proxied
    )
    assert (r.status_code, _code(r)) == (404, "unknown_prediction_id")  # past the guard
    proxied["origin"] = "https://other.example.com"
    r = httpx.post(
        f"{named.url}/feedback", json={"prediction_id": "x", "label": "cat"}, headers=proxied
    )
    assert (r.status_code, _code(r)) == (403, "cross_origin")


def test_a_bad_allowed_hosts_stops_the_start(server_process):
    server = server_process(ALLOWED_HOSTS="api.example.com,,")
    server.proc.wait(timeout=30)
    assert server.proc.returncode == 2
    assert "ALLOWED_HOSTS: invalid value" in server.output()


def test_a_server_on_every_interface_keeps_the_rule_and_answers_its_own_names(server_process):
    """Bound to ::, an IPv4 client of 127.0.0.1 arrives as ::ffff:127.0.0.1, which the loopback
    rule did not know: a rebinding page passed. Bound to 0.0.0.0 or ::, the address the server
    printed (0.0.0.0) and the machine's own name (127.0.1.1 on Debian) were refused."""
    import socket

    for host, printed in (("::", "[::1]"), ("0.0.0.0", "127.0.0.1")):
        server = server_process(HOST=host)
        server.wait_ready()
        port = server.url.rsplit(":", 1)[1]
        records = [json.loads(x) for x in server.output(10**9).splitlines() if x.startswith("{")]
        [ready] = [r for r in records if r.get("message") == "ready"]
        assert ready["url"] == f"http://{printed}:{port}"  # an address to call, not 0.0.0.0
        r = httpx.get(f"{server.url}/metadata", headers={"host": f"{EVIL}:{port}"})
        assert (r.status_code, _code(r)) == (400, "invalid_host"), host
        wildcard = "[::]" if ":" in host else "0.0.0.0"
        for name in (wildcard, socket.gethostname(), "localhost."):
            r = httpx.get(f"{server.url}/metadata", headers={"host": f"{name}:{port}"})
            assert r.status_code == 200, (host, name, r.text)
        server.terminate()
