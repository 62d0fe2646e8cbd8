"""The server: one loaded model and one generation queue behind the OpenAI routes and the chat
window (Gradio, mounted at /)."""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager

import gradio as gr
import uvicorn
from fastapi import FastAPI

from kimivl_local.errors import KimiVLError

from .handlers import ChatHandlers
from .openai_api import openai_router
from .ui import CSS, build_ui
from .worker import GenerationQueue

# System fonts only: the app must look right offline, without Google Fonts.
THEME = gr.themes.Soft(
    primary_hue="indigo", neutral_hue="slate",
    font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


def build_app(model, *, max_upload_mb: int = 100, max_waiting: int = 32) -> FastAPI:
    """The ASGI app for a loaded `KimiVL`. Its generation queue is `app.state.generation_queue`;
    it is closed when the app shuts down."""
    model.engine.context_setting = None  # clients cannot pass --max-context: name the limit
    queue = GenerationQueue(model, max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        queue.close()

    app = FastAPI(title="kimivl-local", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.generation_queue = queue
    app.include_router(openai_router(queue, max_upload_mb * 2**20))
    demo = build_ui(ChatHandlers(queue), model)
    return gr.mount_gradio_app(app, demo, path="/", max_file_size=max_upload_mb * 2**20,
                               theme=THEME, css=CSS, ssr_mode=False, footer_links=["settings"])


def check_port(host: str, port: int) -> None:
    """Raise KimiVLError when host:port cannot be listened on (in use, or no such address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(infos[0][4])
    except OSError as exc:
        raise KimiVLError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                          "pass another --port or --host") from None


def serve(model, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: int = 100) -> None:
    uvicorn.run(build_app(model, max_upload_mb=max_upload_mb), host=host, port=port,
                log_level="warning")
