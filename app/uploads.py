"""Files in the chat window: the server opens only what was uploaded to it.

A Gradio client may name any server path in a message's FileData (`{"path": "/etc/x.png",
"meta": {"_type": "gradio.FileData"}}`). Gradio copies that file into its cache before the handler
runs and serves the copy; its own "was this uploaded?" check is skipped for an app mounted on
FastAPI (it only runs once `launch()` has set `has_launched`). So the textbox checks every path a
client sends against this server's upload folder before a byte is read or copied; the file route
serves uploads only, and the routes that fetch remote URLs or serve what the chat does not use
are closed (`closed_routes`). The app has no examples, allowed_paths or static paths.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
from urllib.parse import unquote

import gradio as gr
from gradio_client import utils as client_utils
from starlette.responses import JSONResponse

log = logging.getLogger("kimivl_local.app")

# Active content: Gradio serves an SVG inline, so an uploaded one could script the app's origin.
REFUSED_SUFFIXES = (".svg", ".svgz")

# Gradio routes the chat never uses that fetch URLs for a client, report on other users' events,
# run ffmpeg on a recording, read files of custom components (the app has none), or belong to
# Gradio's dev tools.
CLOSED = re.compile(r"/(gradio_api/)?(proxy=|process_recording|monitoring|custom_component/|"
                    r"vibe-|undo-vibe-|run-history|runs|profiling|dev/)", re.IGNORECASE)
# Gradio's file route serves its upload folder, but also its examples cache (a folder relative to
# the working directory) and static paths; here it serves uploads only.
FILE_ROUTE = re.compile(r"/gradio_api/file[=/](.*)", re.IGNORECASE | re.DOTALL)
UPLOAD_ROUTE = re.compile(r"/(gradio_api/)?upload/?", re.IGNORECASE)
# Uploads stay for the server's lifetime (a later turn of a chat reads its files again). Past
# this many --max-upload-mb's worth in the folder, new uploads are refused instead of filling the
# disk of whoever exposed the port.
STORED_UPLOADS = 32


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


def closed_routes(app, upload_dir: str, max_stored_bytes: int) -> None:
    """Answer 404 for the Gradio routes in CLOSED and for a file route naming anything but an
    upload, and 507 for an upload once the folder holds max_stored_bytes, before Gradio sees the
    request."""

    @app.middleware("http")
    async def refuse(request, call_next):
        path = unquote(request.url.path)
        served = FILE_ROUTE.match(path)
        if CLOSED.match(path) or (served and not is_uploaded(served[1], upload_dir)):
            return JSONResponse({"error": {"message": "not found", "type": "invalid_request_error",
                                           "param": None, "code": "not_found"}}, status_code=404)
        if request.method == "POST" and UPLOAD_ROUTE.fullmatch(path):
            stored = folder_bytes(upload_dir)
            if stored >= max_stored_bytes:
                log.warning("upload refused: the upload folder holds %d MiB (limit %d MiB)",
                            stored >> 20, max_stored_bytes >> 20)
                message = (f"this server already holds {stored >> 20} MiB of uploads (its limit is "
                           f"{max_stored_bytes >> 20} MiB); restart it to clear them")
                return JSONResponse({"error": {"message": message, "type": "insufficient_storage",
                                               "param": None, "code": "uploads_full"}},
                                    status_code=507)
        return await call_next(request)


def folder_bytes(folder: str) -> int:
    """Bytes of the files under folder (links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed meanwhile
                pass
    return total
