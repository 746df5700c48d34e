"""A request's JSON body, as every route that takes one reads it: refused with the status
that says what to fix: 415 for a body not sent as JSON, 400 for one that does not parse, is
not an object, nests thousands deep or holds a lone surrogate.

JSON only, by its Content-Type: a web page can send a text/plain or form body to any
server without asking (a CORS "simple request"), but a JSON one only after a preflight
that this server never grants, so no page a local user visits can drive its API.

A lone surrogate (`"\\ud800"` with no pair) is valid JSON but no text: it cannot be
encoded, tokenized or echoed in an error message. It is refused here, wherever in the
body it is, rather than field by field.
"""

from __future__ import annotations

import json
import re

from fastapi import Request

from loom.runtime.http.errors import APIError, as_api_error
from loom.runtime.sampling.params import is_valid_unicode

JSON_MEDIA_TYPE = "application/json"
# Where a body can hold a surrogate at all: JSON's \u escapes (raw UTF-8 cannot encode one).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


async def read_json(request: Request) -> dict:
    """The body as a JSON object, or an APIError saying what is wrong with it."""
    _check_media_type(request.headers.get("content-type"))
    raw = await request.body()
    body = _parse(raw)
    if _SURROGATE_ESCAPE.search(raw):  # most bodies have none: no walk
        where = _lone_surrogate_at(body)
        if where is not None:
            raise APIError(
                400,
                f"`{where}` holds a lone surrogate (a \\ud800-\\udfff escape without its "
                "pair), which is not text; send valid Unicode",
                param=where,
            )
    return body


def _check_media_type(content_type: str | None) -> None:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        raise APIError(
            415,
            f"send the body as JSON with `Content-Type: {JSON_MEDIA_TYPE}` "
            f"(got {media_type or 'no Content-Type'})",
        )


def _parse(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from e
    except RecursionError as e:
        raise as_api_error(e) from e
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _lone_surrogate_at(body: dict) -> str | None:
    """The path (`messages[0].content`) of the first string or key holding a lone
    surrogate, or None. A loop, not recursion: the body may nest as deep as json.loads let
    it, which is as deep as the stack allows."""
    stack: list[tuple[str, object]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not is_valid_unicode(value):
            return path
        if isinstance(value, dict):
            for key, item in value.items():
                name = key if is_valid_unicode(key) else ascii(key)
                where = f"{path}.{name}" if path else name
                if name != key:
                    return where
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None
