"""Files in the chat window: the server opens only what was uploaded to it.

A Gradio client may name any server path in a message's FileData (`{"path": "/etc/x.png",
"meta": {"_type": "gradio.FileData"}}`). Gradio copies that file into its cache before the handler
runs and serves the copy; its own "was this uploaded?" check is skipped for an app mounted on
FastAPI (it only runs once `launch()` has set `has_launched`). So the textbox checks every path a
client sends against this server's upload folder before a byte is read or copied, and the routes
that fetch remote URLs or serve what the chat does not use are closed (`closed_routes`).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from urllib.parse import unquote

import gradio as gr
from gradio_client import utils as client_utils
from starlette.responses import JSONResponse

# Active content: Gradio serves an SVG inline, so an uploaded one could script the app's origin.
REFUSED_SUFFIXES = (".svg", ".svgz")

# Gradio routes the chat never uses that fetch URLs for a client, report on other users' events,
# run ffmpeg on a recording, or belong to Gradio's dev tools. Matched after the mount path.
CLOSED = re.compile(r"/(gradio_api/)?(proxy=|file=[a-z][a-z0-9+.-]*:|file/[a-z][a-z0-9+.-]*:|"
                    r"process_recording|monitoring|vibe-|undo-vibe-|run-history|runs|"
                    r"profiling|dev/)", re.IGNORECASE)


def private_upload_dir() -> str:
    """Gradio's upload folder for this process, set before the app is built: GRADIO_TEMP_DIR when
    the user chose one, else a new private folder (mode 0700, removed at exit), so that this
    server never serves files another Gradio app left in the shared /tmp/gradio."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        folder = tempfile.mkdtemp(prefix="kimivl-uploads-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["GRADIO_TEMP_DIR"] = folder
    return os.environ["GRADIO_TEMP_DIR"]


def is_uploaded(path: str, upload_dir: str) -> bool:
    """Whether path, links and `..` resolved, lies inside upload_dir."""
    real, root = os.path.realpath(path), os.path.realpath(upload_dir)
    return real != root and os.path.commonpath([real, root]) == root

from gradio.events import Dependency

class UploadedFilesTextbox(gr.MultimodalTextbox):
    """A MultimodalTextbox that takes files from this server's upload folder only."""

    is_template = True  # the browser renders it as the MultimodalTextbox it is

    def _check(self, path) -> None:
        if path is None:
            return
        path = str(path)
        if client_utils.is_http_url_like(path) or not is_uploaded(path, self.GRADIO_CACHE):
            log.warning("refused a file that was not uploaded: %r", path)
            raise gr.Error("attach files with the upload button: the server opens no file that "
                           "was not uploaded to it", title="File refused", print_exception=False)
        if path.lower().endswith(REFUSED_SUFFIXES):
            raise gr.Error(f"{os.path.basename(path)}: SVG files are not accepted",
                           title="File refused", print_exception=False)

    async def async_move_resource_to_block_cache(self, url_or_file_path):
        self._check(url_or_file_path)
        return await super().async_move_resource_to_block_cache(url_or_file_path)

    def move_resource_to_block_cache(self, url_or_file_path):
        self._check(url_or_file_path)
        return super().move_resource_to_block_cache(url_or_file_path)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


def closed_routes(app, mount: str = "") -> None:
    """Answer 404 for the Gradio routes in CLOSED (see above), before Gradio sees the request."""

    @app.middleware("http")
    async def refuse(request, call_next):
        path = unquote(request.url.path)
        if path.startswith(mount) and CLOSED.match(path[len(mount.rstrip("/")):]):
            return JSONResponse({"error": {"message": "not found", "type": "invalid_request_error",
                                           "param": None, "code": "not_found"}}, status_code=404)
        return await call_next(request)