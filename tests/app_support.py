"""Shared by the app tests: importing the app from a source checkout, and a live server."""

from __future__ import annotations

import importlib
import importlib.util
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The chat window's settings as ChatHandlers.submit takes them: greedy, a short answer.
SETTINGS = dict(system="", temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=8, pdf_pages="",
                pdf_text=False)


def import_app(module: str):
    """kimivl_local.app.<module>. Installed, app/ is that subpackage (setup.py's package_dir);
    from a source checkout on PYTHONPATH it is mapped the same way here."""
    if importlib.util.find_spec("kimivl_local.app") is None:
        import kimivl_local

        spec = importlib.util.spec_from_file_location(
            "kimivl_local.app", REPO / "app" / "__init__.py",
            submodule_search_locations=[str(REPO / "app")])
        package = importlib.util.module_from_spec(spec)
        sys.modules["kimivl_local.app"] = package
        spec.loader.exec_module(package)
        kimivl_local.app = package
    return importlib.import_module(f"kimivl_local.app.{module}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app, startup_timeout: float = 30.0, **config):
    """Serve an ASGI app on 127.0.0.1 in a thread, with the settings `serve` uses (config:
    more of them, e.g. client_timeout); yield its base URL."""
    import uvicorn

    transport = import_app("transport")
    server = uvicorn.Server(transport.server_config(app, "127.0.0.1", free_port(), lifespan="on",
                                                    timeout_graceful_shutdown=2, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(15)


def drop_mid_request(base_url: str, partial_request: bytes, caplog, pause: float) -> str:
    """Send the start of a request, hang up after `pause` seconds, and return the one access-log
    line the server wrote about it (the test asserts its shape)."""
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(partial_request)
        time.sleep(pause)
    deadline = time.monotonic() + 5
    while not any("disconnected" in r.message for r in caplog.records) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = [r.message for r in caplog.records if "disconnected" in r.message]
    return line
