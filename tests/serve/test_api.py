"""Contract tests of every endpoint, in-process against the tiny model (CONTRACTS.md, Server)."""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest
from conftest import BLUE, CLASS_NAMES, RED, TINY_VERSION, image_bytes, photos, prom, run, serve
from PIL import Image

from server.app import create_app

pytestmark = pytest.mark.serve


def _assert_prediction(body: dict, label: str) -> None:
    assert body["label"] == label
    assert set(body["probabilities"]) == set(CLASS_NAMES)
    assert math.isclose(sum(body["probabilities"].values()), 1.0, rel_tol=1e-5)
    assert body["confidence"] == max(body["probabilities"].values())
    assert 0.5 < body["confidence"] < 1.0  # the tiny model is not saturated: real softmax
    assert body["model_version"] == TINY_VERSION
    assert body["latency_ms"] > 0
    assert len(body["prediction_id"]) == 32
    assert body["prediction_id"] != body["request_id"]


def test_health_endpoints(settings):
    async def scenario():
        async with serve(create_app(settings)) as client:
            assert (await client.get("/health")).json() == {"status": "ok"}
            assert (await client.get("/health/live")).status_code == 200
            ready = await client.get("/health/ready")
            assert ready.status_code == 200
            assert ready.json()["status"] == "ready"

    run(scenario())


def test_not_ready_before_startup(settings):
    async def scenario():
        import httpx

        app = create_app(settings)  # no lifespan run: the model is not loaded
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/health/ready")
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "not_ready"
            assert (await client.get("/health/live")).status_code == 200

    run(scenario())


def test_predict_raw_and_multipart(settings):
    async def scenario():
        async with serve(create_app(settings)) as client:
            raw = await client.post(
                "/predict", content=image_bytes(RED), headers={"content-type": "image/jpeg"}
            )
            assert raw.status_code == 200
            _assert_prediction(raw.json(), "cat")
            assert raw.json()["request_id"] == raw.headers["x-request-id"]
            form = await client.post(
                "/predict", files={"file": ("blue.png", image_bytes(BLUE, fmt="PNG"), "image/png")}
            )
            assert form.status_code == 200
            _assert_prediction(form.json(), "dog")

    run(scenario())


def test_predict_matches_direct_onnxruntime(settings):
    """The server's answer is the model's own softmax on the shared preprocessing's input."""
    import onnxruntime as ort

    from catsdogs.preprocessing import preprocess_bytes

    data = photos("cat", 1, "originals")[0].read_bytes()

    async def scenario():
        async with serve(create_app(settings)) as client:
            return (await client.post("/predict", files={"file": ("x.jpg", data)})).json()

    body = run(scenario())
    session = ort.InferenceSession(settings.model_path, providers=["CPUExecutionProvider"])
    from conftest import tiny_contract

    x = preprocess_bytes(data, tiny_contract().preprocessing)[None]
    (expected,) = session.run(["probabilities"], {"image": x})
    got = [body["probabilities"][c] for c in CLASS_NAMES]
    np.testing.assert_allclose(got, expected[0], rtol=1e-6)


def test_batch_in_order_with_per_image_errors(settings):
    async def scenario():
        async with serve(create_app(settings)) as client:
            files = [
                ("files", ("red.jpg", image_bytes(RED), "image/jpeg")),
                ("files", ("junk.jpg", b"not an image at all", "image/jpeg")),
                ("files", ("blue.webp", image_bytes(BLUE, fmt="WEBP"), "image/webp")),
            ]
            response = await client.post("/predict/batch", files=files)
            assert response.status_code == 200
            entries = response.json()["predictions"]
            assert [e.get("filename") for e in entries] == ["red.jpg", "junk.jpg", "blue.webp"]
            _assert_prediction(entries[0], "cat")
            assert entries[1]["error"]["code"] == "not_an_image"
            assert "label" not in entries[1]
            _assert_prediction(entries[2], "dog")
            rid = response.headers["x-request-id"]
            # every entry carries the request's id and its own unique prediction id
            assert entries[0]["request_id"] == entries[2]["request_id"] == rid
            assert len({entries[0]["prediction_id"], entries[2]["prediction_id"], rid}) == 3

    run(scenario())


def test_batch_on_real_photos(settings):
    """Original-size shared photos (JPEG, up to a few megapixels) decode and predict."""
    paths = photos("cat", 4, "originals") + photos("dog", 4, "originals")

    async def scenario():
        async with serve(create_app(settings)) as client:
            files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
            response = await client.post("/predict/batch", files=files)
            assert response.status_code == 200
            entries = response.json()["predictions"]
            assert [e["filename"] for e in entries] == [p.name for p in paths]
            for entry in entries:
                assert entry["label"] in CLASS_NAMES
                assert math.isclose(sum(entry["probabilities"].values()), 1.0, rel_tol=1e-5)

    run(scenario())


def test_monitor_sees_every_predicted_image(settings):
    data = photos("dog", 1, "originals")[0].read_bytes()
    with Image.open(photos("dog", 1, "originals")[0]) as img:
        size = img.size

    async def scenario():
        app = create_app(settings)
        async with serve(app) as client:
            events = []
            app.state.monitor.observe = events.append
            await client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
            await client.post(
                "/predict/batch",
                files=[("files", ("a", image_bytes(RED))), ("files", ("b", b"bad"))],
            )
            payload = {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [base64.b64encode(image_bytes(BLUE)).decode()],
                    }
                ]
            }
            await client.post("/v2/models/catsdogs/infer", json=payload)
            return events

    events = run(scenario())
    assert [e.route for e in events] == ["/predict", "/predict/batch", "/v2/models/{name}/infer"]
    import hashlib

    first = events[0]
    assert first.input_sha256 == hashlib.sha256(data).hexdigest()
    assert (first.width, first.height) == size
    assert 0 < first.brightness < 255
    assert first.model_version == TINY_VERSION
    assert first.label in CLASS_NAMES
    assert [e.label for e in events[1:]] == ["cat", "dog"]


def test_metadata(settings):
    async def scenario():
        async with serve(create_app(settings)) as client:
            return (await client.get("/metadata")).json()

    meta = run(scenario())
    assert meta["model_name"] == "tiny_color"
    assert meta["model_version"] == TINY_VERSION
    assert meta["class_names"] == list(CLASS_NAMES)
    assert meta["input"]["shape"] == [-1, 32, 32, 3]
    assert meta["preprocessing"]["resize"] == 36
    assert meta["lineage"]["mlflow_run_id"] == "run-0"
    assert meta["lineage"]["data_version"] == "d" * 64
    assert meta["metrics"] == {"accuracy": 1.0, "n": 4}
    assert meta["cascade"] is None  # one model (a cascade file: tests/train/test_cascade.py)


def test_metrics_exposition(settings):
    async def scenario():
        async with serve(create_app(settings)) as client:
            for color in (RED, RED, BLUE):
                await client.post(
                    "/predict", content=image_bytes(color), headers={"content-type": "image/jpeg"}
                )
            await client.get("/no/such/path/123")
            await client.get("/no/such/path/456")
            return (await client.get("/metrics")).text

    text = run(scenario())
    assert prom(text, "http_requests_total", route="/predict", method="POST", status="200") == 3
    assert prom(text, "http_request_duration_seconds_count", route="/predict") == 3
    assert prom(text, "predictions_total", label="cat") == 2
    assert prom(text, "predictions_total", label="dog") == 1
    assert prom(text, "prediction_confidence_count") == 3
    assert prom(text, "inference_batch_size_count") == 3
    assert prom(text, "inference_queue_wait_seconds_count") == 3
    assert prom(text, "inference_run_seconds_count") == 3
    assert prom(text, "http_requests_in_flight") == 1  # the /metrics request itself
    assert prom(text, "model_info", version=TINY_VERSION, name="tiny_color") == 1
    # raw paths never become label values: all unmatched paths share one label
    assert "/no/such/path" not in text
    assert prom(text, "http_requests_total", route="<unmatched>", status="404") == 2


def test_request_id_in_and_out(settings):
    async def scenario():
        async with serve(create_app(settings)) as client:
            mine = await client.get("/health", headers={"x-request-id": "client-id_1.2:3"})
            assert mine.headers["x-request-id"] == "client-id_1.2:3"
            unsafe = await client.get("/health", headers={"x-request-id": "bad id\twith spaces"})
            assert unsafe.headers["x-request-id"] != "bad id\twith spaces"
            assert len(unsafe.headers["x-request-id"]) == 32
            # whitespace around a header's value is not part of it: kept, as the parser strips
            # the leading part only ("abc " was replaced by a new id, " abc" kept as "abc")
            padded = await client.get("/health", headers={"x-request-id": "client-7 \t "})
            assert padded.headers["x-request-id"] == "client-7"
            long = await client.get("/health", headers={"x-request-id": "a" * 500})
            assert long.headers["x-request-id"] != "a" * 500
            missing = await client.get("/missing")
            assert missing.status_code == 404
            assert missing.headers["x-request-id"]
            assert missing.json()["error"]["code"] == "not_found"
            wrong = await client.get("/predict")
            assert wrong.status_code == 405
            assert wrong.json()["error"]["code"] == "method_not_allowed"
            assert wrong.headers["x-request-id"]
            predicted = await client.post(
                "/predict",
                content=image_bytes(RED),
                headers={"content-type": "image/jpeg", "x-request-id": "req-42"},
            )
            assert predicted.json()["request_id"] == "req-42"

    run(scenario())


def test_unexpected_error_is_a_json_500_without_details(settings, caplog):
    async def scenario():
        app = create_app(settings)
        async with serve(app) as client:

            def broken(probs):
                raise RuntimeError("secret internal detail")

            app.state.predictor.describe = broken
            response = await client.post(
                "/predict", content=image_bytes(RED), headers={"content-type": "image/jpeg"}
            )
            assert response.status_code == 500
            assert response.json() == {
                "error": {"code": "internal_error", "message": "an unexpected error occurred"}
            }
            assert "secret" not in response.text
            assert response.headers["x-request-id"]
            assert (await client.get("/health/ready")).status_code == 200

    run(scenario())
    assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)


def test_openapi_describes_every_endpoint(settings):
    async def scenario():
        app = create_app(settings)
        async with serve(app) as client:
            spec = (await client.get("/openapi.json")).json()
            return app, spec

    app, spec = run(scenario())
    assert spec["openapi"].startswith("3.")
    from starlette.routing import Route

    for route in app.routes:
        if isinstance(route, Route):
            assert route.path in spec["paths"], route.path
            for method in route.methods - {"HEAD"}:
                assert method.lower() in spec["paths"][route.path]
    for path in ("/predict", "/predict/batch", "/v2/models/{name}/infer", "/feedback"):
        assert path in spec["paths"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert refs
    assert refs <= set(spec["components"]["schemas"])  # every reference resolves
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert operation["responses"], f"{method} {path} documents no response"


def test_docs_served_from_local_files(settings):
    async def scenario():
        async with serve(create_app(settings)) as client:
            page = await client.get("/docs")
            assert page.status_code == 200
            assert "text/html" in page.headers["content-type"]
            assert "http://" not in page.text
            assert "https://" not in page.text
            for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
                assert f"/docs/static/{asset}" in page.text
                served = await client.get(f"/docs/static/{asset}")
                assert served.status_code == 200
                assert len(served.content) > 10_000
            # no inline script: the policy allows this origin's scripts only, and no framing
            policy = page.headers["content-security-policy"]
            assert "script-src 'self';" in policy
            assert "frame-ancestors 'none'" in policy
            assert "<script>" not in page.text
            start = await client.get("/ui/docs-init.js")
            assert start.status_code == 200
            assert "SwaggerUIBundle" in start.text
            assert "/openapi.json" in start.text
            # the package's other files are not served: a stock page loading a spec from the
            # internet, an OAuth redirect page, templates, source maps
            for other in ("index.html", "oauth2-redirect.html", "index.j2", "swagger-ui.js.map"):
                refused = await client.get(f"/docs/static/{other}")
                assert refused.status_code == 404, other

    run(scenario())


# ---------------------------------------------------------------------- V2, raw HTTP
def test_v2_metadata_and_health(settings):
    async def scenario():
        async with serve(create_app(settings)) as client:
            server = (await client.get("/v2")).json()
            assert "binary_tensor_data" in server["extensions"]
            assert (await client.get("/v2/health/live")).status_code == 200
            assert (await client.get("/v2/health/ready")).status_code == 200
            meta = (await client.get("/v2/models/catsdogs")).json()
            assert meta["name"] == "catsdogs"
            assert meta["versions"] == [TINY_VERSION]
            assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
            outputs = {o["name"]: o for o in meta["outputs"]}
            assert outputs["probabilities"]["datatype"] == "FP32"
            assert outputs["probabilities"]["shape"] == [-1, 2]
            assert outputs["label"]["datatype"] == "BYTES"
            assert (await client.get("/v2/models/catsdogs/ready")).status_code == 200
            unknown = await client.get("/v2/models/nope/ready")
            assert unknown.status_code == 404
            assert isinstance(unknown.json()["error"], str)

    run(scenario())


def test_v2_infer_json(settings):
    images = [image_bytes(RED), image_bytes(BLUE)]
    payload = {
        "id": "my-call",
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(b).decode() for b in images],
            }
        ],
    }

    async def scenario():
        async with serve(create_app(settings)) as client:
            return await client.post("/v2/models/catsdogs/infer", json=payload)

    response = run(scenario())
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == "my-call"
    assert body["model_name"] == "catsdogs"
    outputs = {o["name"]: o for o in body["outputs"]}
    probs = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert outputs["label"]["data"] == ["cat", "dog"]
    assert outputs["label"]["shape"] == [2]


def test_v2_infer_binary_extension(settings):
    images = [image_bytes(BLUE), image_bytes(RED), image_bytes(BLUE)]
    blob = b"".join(len(b).to_bytes(4, "little") + b for b in images)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "label", "parameters": {"binary_data": False}},
            ],
        }
    ).encode()

    async def scenario():
        async with serve(create_app(settings)) as client:
            response = await client.post(
                "/v2/models/catsdogs/infer",
                content=header + blob,
                headers={
                    "inference-header-content-length": str(len(header)),
                    "content-type": "application/octet-stream",
                },
            )
            n = int(response.headers["inference-header-content-length"])
            ids = json.loads(response.content[:n])["parameters"]["prediction_ids"].split(",")
            # each image of the request is logged apart: feedback names one by its id
            feedback = [
                await client.post("/feedback", json={"prediction_id": i, "label": "cat"})
                for i in ids
            ]
            return response, ids, feedback

    response, ids, feedback = run(scenario())
    assert len(set(ids)) == 3
    assert [f.status_code for f in feedback] == [201, 201, 201], feedback[0].text
    assert [f.json()["predicted_label"] for f in feedback] == ["dog", "cat", "dog"]
    assert response.status_code == 200
    n = int(response.headers["inference-header-content-length"])
    body = json.loads(response.content[:n])
    outputs = {o["name"]: o for o in body["outputs"]}
    size = outputs["probabilities"]["parameters"]["binary_data_size"]
    assert size == 3 * 2 * 4
    probs = np.frombuffer(response.content[n : n + size], dtype="<f4").reshape(3, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert list(probs.argmax(axis=1)) == [1, 0, 1]
    assert outputs["label"]["data"] == ["dog", "cat", "dog"]


def test_model_uri_wins_over_model_path(settings, tiny_model):
    from dataclasses import replace

    changed = replace(settings, model_path="does/not/exist.onnx", model_uri=tiny_model.as_uri())

    async def scenario():
        app = create_app(changed)
        async with serve(app) as client:
            meta = (await client.get("/metadata")).json()
            return meta, app.state.model.path

    meta, path = run(scenario())
    assert path == tiny_model
    assert meta["lineage"]["source"] == tiny_model.as_uri()


def test_octet_stream_body_is_an_image(settings):
    async def scenario():
        async with serve(create_app(settings)) as client:
            headers = {"content-type": "application/octet-stream"}
            return await client.post("/predict", content=image_bytes(BLUE), headers=headers)

    response = run(scenario())
    assert response.status_code == 200
    assert response.json()["label"] == "dog"


def test_uploads_never_touch_the_disk(settings, monkeypatch):
    """A multi-megabyte multipart upload (Starlette would spool it to a file) stays in memory."""
    import io
    import tempfile

    def no_files(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")

    import starlette.formparsers

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_files)
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", no_files)
    noise = np.random.default_rng(0).bytes(1200 * 900 * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (1200, 900), noise).save(buf, format="PNG")
    noisy = buf.getvalue()
    assert len(noisy) > 2 * 1024 * 1024

    async def scenario():
        async with serve(create_app(settings)) as client:
            one = await client.post("/predict", files={"file": ("n.png", noisy)})
            files = [("files", ("r.jpg", image_bytes(RED))), ("files", ("n.png", noisy))]
            many = await client.post("/predict/batch", files=files)
            return one, many

    one, many = run(scenario())
    assert one.status_code == 200
    assert many.status_code == 200
    labels = [e["label"] for e in many.json()["predictions"]]
    assert labels[0] == "cat"
    assert labels[1] in CLASS_NAMES


@pytest.mark.parametrize("shape", [(224, 224, 3), (1, 1, 3), (2369, 2369, 3), (2370, 2370, 3)])
def test_brightness_is_exactly_the_mean_of_the_model_input(shape):
    from server.service import brightness

    rng = np.random.default_rng(0)
    for array in (
        rng.integers(0, 256, shape, dtype=np.uint8),
        np.full(shape, 255, dtype=np.uint8),  # 2369 px: the largest 32-bit sum; 2370 px: 64 bits
        np.zeros(shape, dtype=np.uint8),
    ):
        assert brightness(array) == float(array.mean())
