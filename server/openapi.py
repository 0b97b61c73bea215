"""The OpenAPI 3.0 document served at ``/openapi.json`` (and rendered by ``/docs``).

Written out for the endpoints of this package; any other route of the app (monitoring's) gets an
entry from its docstring, so the document always lists every endpoint the app serves.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route

from catsdogs.contract import ModelContract
from server import __version__
from server.ids import ID_PATTERN
from server.settings import Settings

JSON = "application/json"
# An 8 x 8 red PNG, base64: the V2 example request is one a client can send as it is.
_EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8oaHBgA0w"
    "MeAAg1MCAOA4ASjhBhuDAAAAAElFTkSuQmCC"
)


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int, v2: bool = False) -> dict[str, Any]:
    text = {
        400: "Malformed request, or a Host this server does not answer for (invalid_host)",
        401: "API_TOKEN is set and no bearer token was sent",
        403: "The bearer token is not the server's, or a POST from another site's page "
        "(cross_origin)",
        404: "Unknown model, or no logged prediction with this id",
        408: "The head or body did not arrive within HEADER_TIMEOUT_S or BODY_TIMEOUT_S",
        409: "The request_id names several logged photos; send their prediction_id",
        413: "Body, file, pixel count or number of images over the limit",
        415: "Unsupported Content-Type or image format",
        422: "Not a decodable image, or a required field is missing",
        500: "An unexpected error (internal_error), or a model answer that is not usable "
        "probabilities (invalid_model_output); never a trace",
        503: "Queue full or MAX_CONNECTIONS reached (see Retry-After), or not ready",
        504: "The request's deadline passed",
    }
    schema = _ref("V2Error") if v2 else _ref("Error")
    return {str(s): _json(schema, text[s]) for s in statuses}


def _components(classes: list[str]) -> dict[str, Any]:
    probabilities = {
        "type": "object",
        "properties": {c: {"type": "number"} for c in classes},
        "additionalProperties": {"type": "number"},
    }
    an_id = {"type": "string", "pattern": f"^{ID_PATTERN}$"}
    label = {"type": "string", "enum": classes}
    return {
        "schemas": {
            "Error": _error_schema(),
            "V2Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "Prediction": {
                "type": "object",
                "required": [
                    "label",
                    "confidence",
                    "probabilities",
                    "model_version",
                    "request_id",
                    "prediction_id",
                    "latency_ms",
                ],
                "properties": {
                    "label": {"type": "string", "enum": classes},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    "probabilities": probabilities,
                    "model_version": {"type": "string"},
                    "request_id": {"type": "string"},
                    # the image's id in the prediction log: what POST /feedback names
                    "prediction_id": {"type": "string"},
                    "latency_ms": {"type": "number"},
                    "filename": {"type": "string"},
                },
            },
            "BatchEntry": {"oneOf": [_ref("Prediction"), _ref("Error")]},
            "FeedbackRequest": {
                "type": "object",
                "required": ["label"],
                "properties": {"prediction_id": an_id, "request_id": an_id, "label": label},
                # exactly one of the two ids
                "oneOf": [{"required": ["prediction_id"]}, {"required": ["request_id"]}],
            },
            "FeedbackResult": {
                "type": "object",
                "required": ["label", "predicted_label", "correct", "model_version"],
                "properties": {
                    "prediction_id": {"type": "string"},
                    "request_id": {"type": "string"},
                    "label": label,
                    "predicted_label": label,
                    "correct": {"type": "boolean"},
                    "model_version": {"type": "string"},
                },
            },
            "V2Tensor": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "datatype": {"type": "string"},
                    "parameters": {"type": "object", "nullable": True},
                    "data": {"type": "array", "items": {}},
                },
            },
            "V2InferRequest": {
                "type": "object",
                "required": ["inputs"],
                # a null "id", "parameters" or "outputs" is taken as absent (the request's id,
                # no parameters, every output), and so is an empty "outputs"
                "properties": {
                    "id": {"type": "string", "nullable": True},
                    "parameters": {"type": "object", "nullable": True},
                    "inputs": {"type": "array", "items": _ref("V2Tensor")},
                    "outputs": {"type": "array", "items": {"type": "object"}, "nullable": True},
                },
                "example": {
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "BYTES",
                            "shape": [1],
                            "data": [_EXAMPLE_PNG],
                        }
                    ]
                },
            },
            "V2InferResponse": {
                "type": "object",
                "properties": {
                    "model_name": {"type": "string"},
                    "model_version": {"type": "string"},
                    "id": {"type": "string"},
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "prediction_ids": {
                                "type": "string",
                                "description": "each image's id in the prediction log, in input"
                                " order, joined by commas: what POST /feedback names",
                            }
                        },
                    },
                    "outputs": {"type": "array", "items": _ref("V2Tensor")},
                },
            },
        }
    }


def _status(description: str, example: dict[str, Any]) -> dict[str, Any]:
    return _json({"type": "object", "example": example}, description)


def _health_paths() -> dict[str, Any]:
    return {
        "/health": {
            "get": {
                "summary": "Process health",
                "tags": ["health"],
                "responses": {"200": _status("Running", {"status": "ok"})},
            }
        },
        "/health/live": {
            "get": {
                "summary": "Liveness: 200 while the process runs",
                "tags": ["health"],
                "responses": {"200": _status("Alive", {"status": "alive"})},
            }
        },
        "/health/ready": {
            "get": {
                "summary": "Readiness: 200 once the model is loaded and warmed up",
                "tags": ["health"],
                "responses": {
                    "200": _status("Ready", {"status": "ready"}),
                    **_errors(503),
                },
            }
        },
    }


# server.service.is_evaluation: a prediction route's answer alike, its images kept out of the
# prediction log, the drift window, live accuracy and predictions_total
TRAFFIC_PARAM = {
    "name": "X-Traffic-Class",
    "in": "header",
    "required": False,
    "description": (
        "`evaluation`: a deployment's own check. Answered as usual; nothing is logged or "
        "monitored (feedback on its prediction_id is a 404). Needs the bearer token when "
        "`API_TOKEN` is set. Default `production`; any other value is a 400."
    ),
    "schema": {"type": "string", "enum": ["production", "evaluation"]},
}


def _predict_paths(settings: Settings) -> dict[str, Any]:
    image_upload = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    return {
        "/predict": {
            "post": {
                "summary": "Classify one image",
                "description": (
                    "The image as multipart field `file`, or as the raw body with an `image/*` "
                    f"Content-Type. At most {settings.max_upload_bytes} bytes and "
                    f"{settings.max_pixels} pixels. Send `X-Request-ID` to choose the id."
                ),
                "tags": ["predict"],
                "parameters": [TRAFFIC_PARAM],
                "requestBody": image_upload,
                "responses": {
                    "200": _json(_ref("Prediction"), "The prediction"),
                    **_errors(400, 401, 403, 408, 413, 415, 422, 500, 503, 504),
                },
            }
        },
        "/predict/batch": {
            "post": {
                "summary": "Classify several images",
                "description": (
                    f"Up to {settings.max_batch_files} multipart `files` fields; one entry per "
                    "image in order, a prediction or that image's own error."
                ),
                "tags": ["predict"],
                "parameters": [TRAFFIC_PARAM],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["files"],
                                "properties": {
                                    "files": {
                                        "type": "array",
                                        "items": {"type": "string", "format": "binary"},
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "predictions": {"type": "array", "items": _ref("BatchEntry")},
                                "model_version": {"type": "string"},
                            },
                        },
                        "One entry per image",
                    ),
                    **_errors(400, 401, 403, 408, 413, 415, 422, 500, 503, 504),
                },
            }
        },
    }


def _feedback_paths() -> dict[str, Any]:
    return {
        "/feedback": {
            "post": {
                "summary": "The true label of a logged prediction",
                "description": (
                    "JSON only. Name the prediction by exactly one of `prediction_id` "
                    "(preferred) or `request_id` (while it names one photo: a retry under the same "
                    "X-Request-ID labels the last answer). With "
                    "`API_TOKEN` set, send `Authorization: Bearer <token>`."
                ),
                "tags": ["monitoring"],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("FeedbackRequest")}},
                },
                "responses": {
                    "201": _json(_ref("FeedbackResult"), "Stored"),
                    **_errors(400, 401, 403, 404, 408, 409, 413, 415, 422, 500, 503),
                },
            }
        },
    }


def _operations_paths() -> dict[str, Any]:
    return {
        "/metadata": {
            "get": {
                "summary": "The model's contract: classes, input, preprocessing, lineage, metrics",
                "tags": ["model"],
                "responses": {
                    "200": _json(
                        {"type": "object"},
                        "Model metadata. With API_TOKEN set, lineage.source (the model's path or "
                        "registry URI) is null unless the request carries the bearer token.",
                    )
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "tags": ["operations"],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0 document")},
            }
        },
        "/": {
            "get": {
                "summary": "The classifier page for people (HTML; its files are under /ui/)",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "HTML page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/docs": {
            "get": {
                "summary": "Swagger UI (served locally)",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "HTML page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


def _v2_paths(settings: Settings, version: str) -> dict[str, Any]:
    # The one model this server serves; any other name is a 404.
    name_schema = {"type": "string", "enum": [settings.served_model_name]}
    name_param = [{"name": "name", "in": "path", "required": True, "schema": name_schema}]
    paths = {
        "/v2": {
            "get": {
                "summary": "V2 server metadata",
                "tags": ["v2"],
                "responses": {"200": _json({"type": "object"}, "name, version, extensions")},
            }
        },
        "/v2/health/live": {
            "get": {
                "summary": "V2 liveness",
                "tags": ["v2"],
                "responses": {"200": _json({"type": "object"}, "Live")},
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "V2 readiness",
                "tags": ["v2"],
                "responses": {
                    "200": _json({"type": "object"}, "Ready"),
                    "503": _json(_ref("V2Error"), "Not ready"),
                },
            }
        },
        "/v2/models/{name}": {
            "get": {
                "summary": "V2 model metadata",
                "tags": ["v2"],
                "parameters": name_param,
                "responses": {
                    "200": _json({"type": "object"}, "Inputs and outputs"),
                    **_errors(404, v2=True),
                },
            }
        },
        "/v2/models/{name}/ready": {
            "get": {
                "summary": "V2 model readiness",
                "tags": ["v2"],
                "parameters": name_param,
                "responses": {
                    "200": _json({"type": "object"}, "Ready"),
                    **_errors(404, 503, v2=True),
                },
            }
        },
        "/v2/models/{name}/infer": {
            "post": {
                "summary": "V2 inference",
                "description": (
                    f"Model name `{settings.served_model_name}`. One BYTES input named `image` "
                    "of encoded image files: base64 strings in JSON, or raw bytes with the "
                    "binary tensor extension (`Inference-Header-Content-Length`). Outputs "
                    "`probabilities` FP32 [n, C] and `label` BYTES [n]."
                ),
                "tags": ["v2"],
                "parameters": [*name_param, TRAFFIC_PARAM],
                "requestBody": {
                    "required": True,
                    "content": {
                        JSON: {"schema": _ref("V2InferRequest")},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                "responses": {
                    "200": {
                        "description": (
                            "Inference result: JSON, or with binary outputs the JSON header "
                            "(Inference-Header-Content-Length bytes) followed by the tensors"
                        ),
                        "headers": {
                            "Inference-Header-Content-Length": _header(
                                "integer", "with binary outputs: the JSON header's length"
                            )
                        },
                        "content": {
                            JSON: {"schema": _ref("V2InferResponse")},
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            },
                        },
                    },
                    **_errors(400, 401, 403, 404, 408, 413, 415, 422, 500, 503, 504, v2=True),
                },
            }
        },
    }
    # The same three under the protocol's version segment: the one version served (listed by
    # the model's metadata) answers as above; any other is a 404.
    version_param = {
        "name": "version",
        "in": "path",
        "required": True,
        "description": "the served model version, as `GET /v2/models/{name}` lists it",
        "schema": {"type": "string", "enum": [version]},
    }
    model = "/v2/models/{name}"
    for path in [p for p in paths if p.startswith(model)]:
        paths[path.replace(model, model + "/versions/{version}")] = {
            method: {**op, "parameters": [*op["parameters"], version_param]}
            for method, op in paths[path].items()
        }
    return paths


def _paths(settings: Settings, version: str) -> dict[str, Any]:
    """Every documented endpoint, by route group, in the order the document lists them."""
    return {
        **_health_paths(),
        **_predict_paths(settings),
        **_feedback_paths(),
        **_operations_paths(),
        **_v2_paths(settings, version),
    }


def _undocumented(route: Route) -> dict[str, Any]:
    """A minimal entry for a route this module does not describe, from its docstring."""
    doc = (route.endpoint.__doc__ or route.path).strip().splitlines()[0]
    return {
        method.lower(): {
            "summary": doc,
            "responses": {
                "200": {"description": "Success"},
                "default": _json(_ref("Error"), "Error"),
            },
        }
        for method in sorted((route.methods or {"GET"}) - {"HEAD"})
    }


def _header(kind: str, description: str, *, required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": kind}}


REQUEST_ID_PARAM = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": (
        "Your id for this request (letters, digits and `-_.:`, at most 128), echoed in "
        "`X-Request-ID` and the answer's `request_id`; another value is replaced by a new id"
    ),
    "schema": {"type": "string"},
}


def _with_shared_headers(paths: dict[str, Any]) -> dict[str, Any]:
    """What every operation shares, in the document where generated clients see it: the
    X-Request-ID parameter and answer header, Retry-After on a 503 (a refusal for load or a
    shutdown; not-ready answers have none), Accept-Encoding on a 415 (a compressed body)."""
    echoed = _header("string", "the request's id (the client's, or a new one)", required=True)
    for operations in paths.values():
        for op in operations.values():
            op["parameters"] = [*op.get("parameters", []), REQUEST_ID_PARAM]
            for status, response in op["responses"].items():
                headers = {**response.get("headers", {}), "X-Request-ID": echoed}
                if status == "503":
                    headers["Retry-After"] = _header(
                        "integer", "seconds to wait before retrying, on a refusal for load"
                    )
                if status == "415":
                    headers["Accept-Encoding"] = _header(
                        "string", "`identity`, when the body was compressed"
                    )
                op["responses"][status] = {**response, "headers": headers}
    return paths


def build_spec(app: Starlette, contract: ModelContract, settings: Settings) -> dict[str, Any]:
    paths = _paths(settings, contract.model_version)
    for route in app.routes:
        if isinstance(route, Route) and route.path not in paths:
            paths[route.path] = _undocumented(route)
    paths = _with_shared_headers(paths)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Cat or dog photo classifier",
            "version": __version__,
            "description": (
                f"Serves model `{contract.model_name}` version `{contract.model_version}` "
                f"(classes: {', '.join(contract.class_names)}). Errors: "
                '`{"error": {"code", "message"}}`, and `{"error": "message"}` under `/v2`.'
            ),
        },
        "paths": paths,
        "components": _components(list(contract.class_names)),
    }
