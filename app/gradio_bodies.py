"""Gradio's event routes take well-formed bodies only: the rest get a short 4xx, not a 500.

Gradio checks these bodies' field types (422), but an fn_index that names no handler, an API
name that names no endpoint, `data` with the wrong number of values or keyword arguments the
endpoint does not take end as an uncaught exception deep inside it: HTTP 500 and a traceback in
the server's log. A value its component rejects (a textbox message that is not {text, files}, a
slider value out of range or not a number) is refused later, in Gradio's queue, again with a
traceback. `GradioBodyCheck` reads the body of each event route first (up to the size the API
allows a request, held in memory the same way) and answers what is malformed in OpenAI's error
shape, like the API routes, plus Gradio's "detail" for its browser client; what passes reaches
Gradio unchanged. Which files a message may name stays the textbox's to check (uploads.py).
"""

from __future__ import annotations

import re

import gradio as gr
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from .openai_request import APIError, body_too_big, parse_json, read_body

# Under Gradio's mount at "/": the queue (the browser's queued events), /run and /api (its
# unqueued events, scripts), /call (Gradio's curl-style API: `data` as a list, or in /call/v2
# an object of keyword arguments).
EVENT_ROUTE = re.compile(r"/gradio_api/(?:(queue)/join|(run|api|call|call/v2)/([^/]+))/?")


class GradioBodyCheck:
    """ASGI middleware for `blocks` (the mounted gr.Blocks), with bodies up to max_body_bytes."""

    def __init__(self, app, blocks, max_body_bytes: int):
        self.app, self.blocks, self.max_body_bytes = app, blocks, max_body_bytes
        self._parameters = None  # /call/v2's {endpoint: {parameter: its API info}}, on first use

    async def __call__(self, scope, receive, send):
        route = EVENT_ROUTE.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self._read(scope, receive)
            self._check(route[1] or route[2], route[3], parse_json(body))
        except APIError as exc:  # "detail": what Gradio's browser client shows of an error
            response = JSONResponse({**exc.body(), "detail": exc.message}, exc.status)
            return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # the client's disconnect, if it leaves
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope, receive) -> bytes:
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise body_too_big(self.max_body_bytes)
        # Request.stream raises ClientDisconnect if the client leaves (transport.access_log's 499)
        return await read_body(Request(scope, receive).stream(), self.max_body_bytes)

    def _check(self, kind: str, api_name: str | None, body) -> None:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if kind == "call/v2":
            return self._check_keywords(api_name, body)
        data = body.get("data")
        if not isinstance(data, list):
            raise APIError(400, "'data' must be a list of the event's input values", "data")
        fn_index = body.get("fn_index") if kind != "call" else None  # /call ignores it
        if fn_index is not None:
            if type(fn_index) is not int or fn_index not in self.blocks.fns:
                raise APIError(400, f"'fn_index' {_short(fn_index)} names no event handler",
                               "fn_index")
            fn = self.blocks.fns[fn_index]
        elif api_name is not None:
            fn = self._endpoint(api_name)
        else:
            return  # the queue without an fn_index: Gradio answers 400
        counts = {len(fn.inputs)}
        if kind == "call":  # a script may leave out the inputs the API hides (gr.State)
            counts.add(sum(not block.skip_api for block in fn.inputs))
        if len(data) not in counts:
            expected = " or ".join(str(n) for n in sorted(counts))
            raise APIError(400, f"'data' holds {len(data)} value{'s' * (len(data) != 1)}; "
                                f"{fn.api_name} takes {expected}", "data")
        inputs = fn.inputs if len(data) == len(fn.inputs) else \
            [block for block in fn.inputs if not block.skip_api]
        for block, value in zip(inputs, data):
            _check_value(fn.api_name, block, value)

    def _endpoint(self, api_name: str):
        for fn in self.blocks.fns.values():
            if fn.api_name == api_name:
                return fn
        raise APIError(404, f"no API endpoint named {_short(api_name)}", code="not_found")

    def _check_keywords(self, api_name: str, body: dict) -> None:
        if self._parameters is None:
            self._parameters = {
                name.lstrip("/"): {p["parameter_name"]: p for p in endpoint["parameters"]}
                for name, endpoint in self.blocks.get_api_info()["named_endpoints"].items()}
        parameters = self._parameters.get(api_name)
        if parameters is None:
            raise APIError(404, f"no API endpoint named {_short(api_name)}", code="not_found")
        unknown = [key for key in body if key not in parameters and key != "oauth_token"]
        if unknown:
            raise APIError(400, f"{api_name} takes no argument {_short(unknown[0])} (it takes "
                                f"{', '.join(parameters) or 'none'})", unknown[0][:40])
        missing = [name for name, p in parameters.items()
                   if not p["parameter_has_default"] and name not in body]
        if missing:
            raise APIError(400, f"{api_name} needs the argument {missing[0]!r}", missing[0])
        # Gradio hands them on in this order, defaults filled in, as the API's visible inputs
        inputs = [block for block in self._endpoint(api_name).inputs if not block.skip_api]
        for block, (name, p) in zip(inputs, parameters.items()):
            _check_value(api_name, block, body.get(name, p.get("parameter_default")))


def _check_value(api_name: str, block, value) -> None:
    """The checks Gradio makes before a handler runs that end in a traceback when they fail:
    the component's data model (the textbox's {text, files}), a slider's range."""
    name = f"{api_name}'s {block.label or type(block).__name__} value"
    if block.stateful:  # the server's own state; Gradio ignores what the client sends
        return
    model = getattr(block, "data_model", None)
    if model is not None and value is not None:
        try:
            model.model_validate(value, context={"validate_meta": True})
        except ValidationError as exc:
            raise APIError(400, f"{name} is malformed ({exc.errors()[0]['msg']})", "data") \
                from None
    if isinstance(block, gr.Slider) and (type(value) not in (int, float)
                                         or not block.minimum <= value <= block.maximum):
        raise APIError(400, f"{name} must be a number from {block.minimum} to {block.maximum}, "
                            f"got {_short(value)}", "data")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
