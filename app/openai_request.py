"""Validating an OpenAI chat-completions request into the library's messages and options.

Anything the runtime cannot honour (tools, logprobs, n > 1, remote image URLs) is refused with a
400 that names the parameter, rather than silently ignored; unknown fields are ignored, as
OpenAI-compatible local servers do, because clients send many optional ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any

from fastapi.responses import JSONResponse

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4


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


def parse_chat_request(body: Any, defaults: dict) -> ChatRequest:
    """defaults: temperature, top_p and max_new_tokens used when the request gives none."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in ("tools", "functions", "logprobs"):
        if body.get(name):
            raise APIError(400, f"'{name}' is not supported by kimivl-local", name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    options = {
        "max_new_tokens": _number(body, "max_completion_tokens", int, 1)
        or _number(body, "max_tokens", int, 1) or defaults["max_new_tokens"],
        "temperature": _or(_number(body, "temperature", float, 0, 2), defaults["temperature"]),
        "top_p": _or(_number(body, "top_p", float, 0, 1, open_low=True), defaults["top_p"]),
        "top_k": _or(_number(body, "top_k", int, 0), 0),
        "seed": _number(body, "seed", int),
    }
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    return ChatRequest(_messages(body.get("messages")), options, _stops(body.get("stop")), stream,
                       bool(stream_options.get("include_usage")))


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role {role!r} is not supported (use "
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
            if not isinstance(url, str) or not url.startswith("data:"):
                raise APIError(400, f"{at}: images must be base64 data: URLs (the server runs "
                                    "offline and does not fetch or read files)", at)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise APIError(400, f"{at}: expected a 'text' part with a string 'text' or an "
                                f"'image_url' part, got type {kind!r}", at)
    return parts


def _stops(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} "
                            "of them", "stop")
    return stops


def _number(body: dict, name: str, kind: type, low: float | None = None, high: float | None = None,
            open_low: bool = False):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, Real) and not isinstance(value, bool)
    if ok and kind is int:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else f" {'>' if open_low else '>='} {low}"
        hi = "" if high is None else f" and <= {high}"
        raise APIError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}"
                            f"{lo}{hi}, got {value!r}", name)
    return kind(value)


def _or(value, default):
    return default if value is None else value
