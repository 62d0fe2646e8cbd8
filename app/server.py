"""The server: one loaded model and one generation queue behind the OpenAI routes and the chat
window (Gradio, mounted at /)."""

from __future__ import annotations

import logging
import socket
import sys
from contextlib import asynccontextmanager

import gradio as gr
import uvicorn
from fastapi import FastAPI

from kimivl_local.errors import KimiVLError

from .gradio_bodies import GradioBodyCheck
from .handlers import ChatHandlers
from .openai_api import openai_router
from .transport import server_config
from .ui import CSS, build_ui
from .uploads import STORED_UPLOADS, closed_routes, private_upload_dir
from .worker import GenerationQueue

# System fonts only: the app must look right offline, without Google Fonts.
THEME = gr.themes.Soft(
    primary_hue="indigo", neutral_hue="slate",
    font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


MAX_UPLOAD_MB = 4096  # the API holds a request body in memory


def build_app(model, *, max_upload_mb: int = 100, max_waiting: int = 32) -> FastAPI:
    """The ASGI app for a loaded `KimiVL`. Its generation queue is `app.state.generation_queue`;
    it is closed when the app shuts down."""
    check_upload_mb(max_upload_mb)
    upload_dir = private_upload_dir()  # before any Gradio block exists: each reads it when built
    model.engine.context_setting = None  # clients cannot pass --max-context: name the limit
    queue = GenerationQueue(model, max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        queue.close()

    app = FastAPI(title="kimivl-local", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.generation_queue = queue
    app.include_router(openai_router(queue, max_upload_mb * 2**20))
    demo = build_ui(ChatHandlers(queue), model)
    gr.mount_gradio_app(app, demo, path="/", max_file_size=max_upload_mb * 2**20, theme=THEME,
                        css=CSS, ssr_mode=False, footer_links=[], run_history=False,
                        enable_monitoring=False, mcp_server=False)
    app.add_middleware(GradioBodyCheck, blocks=demo, max_body_bytes=max_upload_mb * 2**20)
    closed_routes(app, upload_dir, STORED_UPLOADS * max_upload_mb * 2**20)
    return app


def check_upload_mb(max_upload_mb) -> None:
    if isinstance(max_upload_mb, bool) or not isinstance(max_upload_mb, int) \
            or not 1 <= max_upload_mb <= MAX_UPLOAD_MB:
        raise KimiVLError(f"--max-upload-mb must be a whole number of MiB from 1 to "
                          f"{MAX_UPLOAD_MB}, got {max_upload_mb!r}")


def check_port(host: str, port: int) -> None:
    """Raise KimiVLError when host:port cannot be listened on (out of range, in use, or no such
    address)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise KimiVLError(f"--port must be from 1 to 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(infos[0][4])
    except (OSError, UnicodeError) as exc:  # UnicodeError: a host name IDNA cannot encode
        raise KimiVLError(f"cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc}"
                          "); pass another --port or --host") from None


def serve(model, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: int = 100) -> None:
    """Run the app until Ctrl-C, logging one line per request to stderr."""
    check_port(host, port)
    logger = logging.getLogger("kimivl_local")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    uvicorn.Server(server_config(build_app(model, max_upload_mb=max_upload_mb), host,
                                 port)).run()
