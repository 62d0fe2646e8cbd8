"""How the app meets the network: uvicorn's settings, a timeout for clients that stall while
sending a request, and one access-log line per request.

uvicorn closes a connection idle between requests (timeout_keep_alive) but waits forever for a
request head or body that never finishes arriving, so a few slow clients (slow-loris) could hold
every connection open. ClientTimeoutProtocol closes a connection whose client owes the server
bytes and has sent none for `client_timeout` seconds; a connection waiting for the model's
answer is never timed out.
"""

from __future__ import annotations

import logging
import time

import h11
import uvicorn
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("kimivl_local.app")

CLIENT_TIMEOUT = 30.0  # seconds without a byte of an unfinished request
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle connection is kept between requests
# Open connections (or requests in flight) past which a new request gets 503 at once: enough for
# a few browser tabs and API clients, few enough that a flood of sockets cannot exhaust the
# process's file descriptors or memory.
MAX_CONNECTIONS = 64


class ClientTimeoutProtocol(H11Protocol):
    client_timeout = CLIENT_TIMEOUT

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._last_data = self.loop.time()
        self._stall_timer = self.loop.call_later(self.client_timeout, self._check_stall)

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        self._stall_timer.cancel()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event) -> None:
        self._stall_timer.cancel()  # the WebSocket protocol takes the connection over
        super().handle_websocket_upgrade(event)

    def _waiting_for_client(self) -> bool:
        # IDLE: no complete request head yet; SEND_BODY: its body is still arriving. When
        # uvicorn paused reading (the app is behind), the client is not the one stalling.
        return (self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and self.conn.our_state
                is not h11.DONE and not self.flow.read_paused)

    def _check_stall(self) -> None:
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if not self._waiting_for_client():
            self._last_data = now
        elif now - self._last_data >= self.client_timeout:
            client = "%s:%d" % self.client if self.client else "a client"
            log.info("closed the connection of %s: no request data for %.0f s", client,
                     now - self._last_data)
            self.transport.close()
            return
        self._stall_timer = self.loop.call_later(
            self.client_timeout - (now - self._last_data), self._check_stall)


def access_log(app):
    """ASGI middleware: one line per HTTP request: method, path, status, tokens, seconds.
    A route reports the tokens it used in request.state.tokens (prompt, completion). A client
    that disconnects while sending its request (any route, Gradio's uploads included) is that
    one line too, not a traceback."""

    async def logged(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        start, status, note = time.perf_counter(), [None], ""

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        except ClientDisconnect:  # 499: nginx's "client closed request"; nobody gets a status
            status[0], note = 499, " (the client disconnected while sending its request)"
        finally:
            tokens = scope.get("state", {}).get("tokens")
            path = repr(scope["path"])[1:-1]  # a decoded %0A must not start a fake log line
            log.info("%s %s %s %s %.3f s%s", scope["method"], path, status[0] or "-",
                     f"{tokens[0]}+{tokens[1]} tokens" if tokens else "-",
                     time.perf_counter() - start, note)

    return logged


def server_config(app, host: str, port: int, client_timeout: float = CLIENT_TIMEOUT,
                  **kwargs) -> uvicorn.Config:
    """The uvicorn settings `serve` runs with (tests start their servers with them too)."""
    protocol = type("ClientTimeoutProtocol", (ClientTimeoutProtocol,),
                    {"client_timeout": client_timeout})
    kwargs.setdefault("limit_concurrency", MAX_CONNECTIONS)
    return uvicorn.Config(access_log(app), host=host, port=port, http=protocol,
                          timeout_keep_alive=KEEP_ALIVE_TIMEOUT, log_level="warning",
                          access_log=False, **kwargs)
