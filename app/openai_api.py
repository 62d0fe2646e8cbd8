"""OpenAI-compatible routes: GET /v1/models and POST /v1/chat/completions (streaming and not).

Requests go through the same generation queue as the chat window. A Thinking model's reasoning
is returned apart from the answer, in `reasoning_content` (as llama.cpp, vLLM and LM Studio do);
`stop` strings apply to the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from kimivl_local.inputs.thinking import ThinkingSplitter

from .chat import default_settings
from .model_info import model_name
from .openai_request import APIError, ChatRequest, parse_chat_request, parse_json, read_body
from .worker import Failed, Finished, GenerationQueue, Job, Piece, QueueFullError

log = logging.getLogger("kimivl_local.app")

FAILURE_STATUS = {"input": (400, None), "context": (400, "context_length_exceeded"),
                  "memory": (500, "out_of_memory"), "internal": (500, None)}


@dataclass
class Outcome:
    finish_reason: str
    usage: dict


def openai_router(queue: GenerationQueue, max_body_bytes: int) -> APIRouter:
    model = queue.model
    name = model_name(model.path)
    created = int(time.time())
    settings = default_settings(model)
    defaults = {"temperature": settings.temperature, "top_p": settings.top_p,
                # no limit but the context, as OpenAI's default
                "max_new_tokens": model.engine.max_context}
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    def models() -> dict:
        return {"object": "list",
                "data": [{"id": name, "object": "model", "created": created,
                          "owned_by": "kimivl-local"}]}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            return await _chat_completions(request)
        except ClientDisconnect:  # the client left while sending its body: transport.access_log
            raise
        except Exception:  # noqa: BLE001 - a bug in one request must not take the server down
            log.exception("POST /v1/chat/completions failed")
            return APIError(500, "internal server error (see the server log)").response()

    async def _chat_completions(request: Request):
        try:
            req = parse_chat_request(await _json_body(request, max_body_bytes), defaults)
            job = queue.submit(req.messages, req.options, loop=asyncio.get_running_loop())
        except QueueFullError as exc:
            return APIError(429, str(exc), code="queue_full", type_="rate_limit_error").response()
        except APIError as exc:
            return exc.response()
        reply = _reply(job, req.stop, request.state)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": name}
        try:
            first = await anext(reply)  # errors before any output still get an HTTP status
        except APIError as exc:
            return exc.response()
        if req.stream:
            return StreamingResponse(_sse(head, req, first, reply), media_type="text/event-stream")
        return await _complete(head, first, reply, request)

    routes = {"/v1/models": "GET", "/v1/chat/completions": "POST"}

    @router.api_route("/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                                "OPTIONS"], include_in_schema=False)
    def unknown(request: Request):
        allowed = routes.get(request.url.path.rstrip("/"))
        if allowed is None:
            return APIError(404, f"no route {request.url.path}; this server has "
                                 f"{', '.join(routes)}", code="unknown_url").response()
        response = APIError(405, f"{request.url.path} takes {allowed} only, not "
                                 f"{request.method}", code="method_not_allowed").response()
        response.headers["allow"] = allowed
        return response

    return router


async def _json_body(request: Request, limit: int):
    if "json" not in request.headers.get("content-type", ""):
        raise APIError(400, "send the body as JSON with Content-Type: application/json")
    return parse_json(await read_body(request.stream(), limit, " (images included)"))


async def _reply(job: Job, stops: list[str],
                 state) -> AsyncIterator[tuple[str, str] | Outcome]:
    """("reasoning_content" | "content", text) pieces, then one Outcome; raises APIError.
    The token counts go to state.tokens (the request's, for the access log)."""
    splitter, matcher, stopped = ThinkingSplitter(), StopMatcher(stops), False
    try:
        async for event in job.aevents():
            if isinstance(event, Piece) and not stopped:
                for channel, text in splitter.feed(event.text):
                    if channel == "thinking":
                        yield "reasoning_content", text
                        continue
                    text, stopped = matcher.feed(text)
                    if text:
                        yield "content", text
                    if stopped:
                        job.cancel()  # then wait for Finished, which carries the usage
                        break
            elif isinstance(event, Finished):
                if not stopped:
                    for channel, text in splitter.flush():
                        key = "reasoning_content" if channel == "thinking" else "content"
                        yield key, text
                    if matcher.pending:
                        yield "content", matcher.pending
                s = event.stats
                state.tokens = (s.prompt_tokens, s.generated_tokens)
                finish = "stop" if stopped or s.finish_reason == "stop" else "length"
                yield Outcome(finish, {"prompt_tokens": s.prompt_tokens,
                                       "completion_tokens": s.generated_tokens,
                                       "total_tokens": s.prompt_tokens + s.generated_tokens})
            elif isinstance(event, Failed):
                status, code = FAILURE_STATUS[event.kind]
                raise APIError(status, event.message, code=code)
    finally:
        job.cancel()  # the client went away, or we are done: a no-op once finished


async def _complete(head: dict, first, reply: AsyncIterator, request: Request) -> JSONResponse:
    text = {"content": "", "reasoning_content": ""}
    item = first
    try:
        while not isinstance(item, Outcome):
            text[item[0]] += item[1]
            if await request.is_disconnected():  # stop the model; nobody reads this answer
                await reply.aclose()
                return JSONResponse({}, status_code=499)
            item = await anext(reply)
    except APIError as exc:
        return exc.response()
    message = {"role": "assistant", "content": text["content"]}
    if text["reasoning_content"]:
        message["reasoning_content"] = text["reasoning_content"]
    return JSONResponse({**head, "object": "chat.completion",
                         "choices": [{"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": item.finish_reason}],
                         "usage": item.usage})


async def _sse(head: dict, req: ChatRequest, first, reply: AsyncIterator) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    item = first
    try:
        while not isinstance(item, Outcome):
            yield chunk({item[0]: item[1]})
            item = await anext(reply)
    except APIError as exc:  # after the headers: report it in the stream, as OpenAI does
        yield f"data: {json.dumps(exc.body())}\n\n"
        return
    finally:
        await reply.aclose()
    yield chunk({}, item.finish_reason)
    if req.include_usage:
        body = {**head, "object": "chat.completion.chunk", "choices": [], "usage": item.usage}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


class StopMatcher:
    """Finds stop strings in streamed text; holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit: nothing after it is emitted)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((_prefix_overlap(self.pending, s) for s in self.stops), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False


def _prefix_overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
