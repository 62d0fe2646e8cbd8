"""Validating an OpenAI chat-completions request into the library's messages and options.

Every field the runtime reads is type- and range-checked here, before the worker sees it; any
input ends as a ChatRequest or an APIError (400 naming the field), never another exception.
Anything the runtime cannot honour (tools, logprobs, n > 1, penalties, remote image URLs) is
refused rather than silently ignored; unknown fields are ignored, as OpenAI-compatible local
servers do, because clients send many optional ones.
"""

from __future__ import annotations

import base64
import binascii
import json
import reprlib
from dataclasses import dataclass
from collections.abc import AsyncIterable
from typing import Any

from fastapi.responses import JSONResponse

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4
MAX_STOP_CHARS = 1000  # stop matching holds back and rescans up to this much text per piece
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes
_short = reprlib.Repr()  # values quoted in messages: bounded in length and depth
_short.maxlevel, _short.maxstring, _short.maxother = 2, 40, 40
_show = _short.repr


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass
class ChatRequest:
    messages: list[dict]
    options: dict  # keyword arguments of KimiVL.generate
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_json(body: bytes) -> Any:
    """The request body as JSON; NaN/Infinity, bad UTF-8 and nesting too deep for Python are
    refused with a 400."""
    def no_constant(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(body, parse_constant=no_constant)
    except RecursionError:
        raise APIError(400, "the body is nested too deeply") from None
    except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
        raise APIError(400, f"the body is not valid JSON ({_first_line(exc)})") from None


def body_too_big(limit: int, what: str = "") -> APIError:
    """The 413 for a body over `limit` bytes (`what` says what counts towards it)."""
    return APIError(413, f"the request body is over {limit // 2**20} MiB{what}; raise "
                         "--max-upload-mb to allow it")


async def read_body(chunks: AsyncIterable[bytes], limit: int, what: str = "") -> bytes:
    """The body from its chunks, refused (body_too_big) as soon as it passes `limit` bytes."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise body_too_big(limit, what)
    return bytes(body)


def parse_chat_request(body: Any, defaults: dict) -> ChatRequest:
    """defaults: temperature, top_p and max_new_tokens used when the request gives none."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in ("tools", "functions", "logprobs", "logit_bias"):
        if body.get(name):
            raise APIError(400, f"'{name}' is not supported by kimivl-local", name)
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, float, -2, 2):
            raise APIError(400, f"'{name}' is not supported by kimivl-local (only 0)", name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError(400, "'model' must be a string", "model")
    if _number(body, "n", int, 1) not in (None, 1):  # null means the default, 1
        raise APIError(400, "only n=1 is supported", "n")
    temperature = _or(_number(body, "temperature", float, 0, 2), defaults["temperature"])
    top_p = _or(_number(body, "top_p", float, 0, 1), defaults["top_p"])
    options = {
        "max_new_tokens": _number(body, "max_completion_tokens", int, 1)
        or _number(body, "max_tokens", int, 1) or defaults["max_new_tokens"],
        "temperature": temperature,
        "top_p": top_p,
        "top_k": _or(_number(body, "top_k", int, 0), 0),
        "seed": _number(body, "seed", int, *SEED_RANGE),
    }
    stream = _boolean(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is None:
        stream_options = {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    include_usage = _boolean(stream_options, "include_usage", "stream_options.include_usage")
    return ChatRequest(_messages(body.get("messages")), options, _stops(body.get("stop")), stream,
                       include_usage)


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise APIError(400, f"{where}.role {_show(role)} is not supported (use "
                                f"{', '.join(sorted(ROLES))})", f"{where}.role")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(content: Any, where: str) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", where)
    parts = []
    for k, part in enumerate(content):
        at = f"{where}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append({"type": "image_url", "image_url": {"url": _data_url(url, at)}})
        else:
            raise APIError(400, f"{at}: expected a 'text' part with a string 'text' or an "
                                f"'image_url' part, got type {_show(kind)}", at)
    return parts


def _data_url(url: Any, at: str) -> str:
    """A data: URL whose payload is valid base64 (decoding the image is the library's job)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise APIError(400, f"{at}: images must be base64 data: URLs (the server runs offline "
                            "and does not fetch or read files)", at)
    head, comma, payload = url.partition(",")
    try:
        if not comma or not head.endswith(";base64") or not base64.b64decode(payload,
                                                                              validate=True):
            raise ValueError("empty")
    except (ValueError, binascii.Error):
        raise APIError(400, f"{at}: not a base64 data: URL (expected "
                            "data:image/...;base64,<data>)", at) from None
    return url


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise APIError(400, f"'stop' must be a string of 1 to {MAX_STOP_CHARS} characters or a "
                            f"list of up to {MAX_STOPS} of them", "stop")
    return stops


def _boolean(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"'{param or name}' must be true or false, got {_show(value)}",
                       param or name)
    return bool(value)


def _number(body: dict, name: str, kind: type, low: float | None = None, high: float | None = None):
    """body[name] as an int or float within [low, high]; None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = value == value and abs(value) != float("inf") and (kind is float or value.is_integer())
    # int/float comparisons are exact in Python, so the range is checked before converting
    # (float() of a 400-digit integer would overflow)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        lo = "" if low is None else f" >= {low}"
        hi = "" if high is None else f" and <= {high}"
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}"
                            f"{lo}{hi}, got {_show(value)}", name)
    return kind(value)


def _or(value, default):
    return default if value is None else value


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
