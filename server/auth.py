"""Bearer-token check for the endpoints that write (``/feedback``) or administer the server, and
for evaluation traffic (``X-Traffic-Class: evaluation``, server.service), which hides predictions
from monitoring.

With ``API_TOKEN`` unset, nothing is required (a private network, a trusted proxy). With it set,
such an endpoint needs ``Authorization: Bearer <API_TOKEN>``: no usable header -> 401 with
``WWW-Authenticate: Bearer``, a wrong token -> 403. ``API_TOKEN_PREVIOUS``, while set, is
accepted too: a rotation deploys the new token beside the old one, moves the clients, then drops
the old one, and no client is refused meanwhile. Prediction and monitoring GET endpoints stay
open, but with a token set they show where the server keeps things (the model's source path
or registry URI, the prediction log's path or database address) only to a caller holding it
(:func:`locations_shown`): reconnaissance for anyone else. Tokens are compared in constant time and
never logged or echoed.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from server.errors import ApiError
from server.settings import Settings

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="catsdogs"'}


def _verdict(request: Request, settings: Settings) -> int:
    """0: no token is set, or the request carries it; 401: no bearer token; 403: a wrong one."""
    expected = settings.api_token
    if not expected:
        return 0
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return 401
    # Starlette decodes headers as latin-1, so this gives back the bytes the client sent
    sent = presented.encode("latin-1")
    current = hmac.compare_digest(sent, expected.encode("ascii"))
    previous = settings.api_token_previous  # both compared, whichever matches
    rotating = hmac.compare_digest(sent, previous.encode("ascii")) if previous else False
    return 0 if current or rotating else 403


def require_token(request: Request, settings: Settings) -> None:
    """Raise :class:`ApiError` (401 or 403) unless the request carries the API token."""
    verdict = _verdict(request, settings)
    if verdict == 401:
        raise ApiError(
            401,
            "unauthorized",
            "this endpoint needs an 'Authorization: Bearer <token>' header",
            headers=dict(_CHALLENGE),
        )
    if verdict == 403:
        raise ApiError(403, "forbidden", "the bearer token is not valid for this endpoint")


def locations_shown(request: Request, settings: Settings) -> tuple[bool, dict[str, str] | None]:
    """Whether the caller may see where the server keeps things (no token is set, a private
    network, or the request carries it), and the headers of such an answer (with a token set it
    varies by ``Authorization``). Never refuses: the open endpoints stay open."""
    headers = {"Vary": "Authorization"} if settings.api_token else None
    return _verdict(request, settings) == 0, headers
