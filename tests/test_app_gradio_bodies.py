"""Malformed bodies on Gradio's event routes get a short 4xx in our error shape, never a 500 or
a traceback in the server's log, and the server goes on serving (app/gradio_bodies.py).

A started server, real HTTP. The comment on each case says what Gradio 6 answered without the
check.
"""

import json

import pytest

from app_support import import_app, running_server

httpx = pytest.importorskip("httpx")
server = import_app("server")

UPLOAD_MB = 1
BOX = {"text": "hi", "files": []}
SETTINGS = ["", 0.0, 1.0, 0, 16, "", False]  # system, temperature, top_p, top_k, max, pdf...


@pytest.fixture(scope="module")
def url(tiny_model_fp32):
    with running_server(server.build_app(tiny_model_fp32, max_upload_mb=UPLOAD_MB)) as base:
        yield base


@pytest.fixture(scope="module")
def submit_index(url) -> int:
    """The chat's submit handler's fn_index, as the browser reads it from /config."""
    config = httpx.get(f"{url}/config", timeout=30).json()
    (index,) = [d["id"] for d in config["dependencies"] if d.get("api_name") == "submit"]
    return index


def join(fn_index, data, session_hash="s1") -> dict:
    return {"data": data, "fn_index": fn_index, "session_hash": session_hash}


CASES = [  # route, body (bytes as sent, else JSON), status, words of the message
    ("queue/join", b"{not json", 400, "not valid JSON"),  # 422
    ("queue/join", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),  # 400
    ("queue/join", [1, 2], 400, "must be a JSON object"),  # 422
    ("queue/join", {"data": "hi", "fn_index": 1, "session_hash": "s1"}, 400, "'data' must be"),
    ("queue/join", join(99_999, []), 400, "'fn_index' 99999 names no event handler"),  # 500
    ("queue/join", join(-1, []), 400, "names no event handler"),  # 500
    ("queue/join", join(True, []), 400, "names no event handler"),  # fn 1
    ("queue/join", join("submit", [BOX, None, *SETTINGS]), 400, "names no event handler"),
    ("queue/join", join("SUBMIT", [BOX]), 400, "'data' holds 1 value; submit takes 9"),  # 200
    ("run/submit", {"data": [BOX]}, 400, "'data' holds 1 value;"),  # 500
    ("run/predict", {"data": [], "fn_index": 99_999}, 400, "names no event handler"),  # 500
    ("run/nope", {"data": []}, 404, "no API endpoint named 'nope'"),  # 500
    ("api/nope", {"data": []}, 404, "no API endpoint named 'nope'"),  # 500
    ("call/nope", {"data": []}, 404, "no API endpoint named 'nope'"),  # 500
    ("call/submit", {"data": [BOX]}, 400, "submit takes 8 or 9"),  # 200, then a traceback
    ("call/submit", {"data": {"box": BOX}}, 400, "'data' must be a list"),  # 422
    ("call/v2/submit", {"data": [BOX, *SETTINGS]}, 400, "takes no argument 'data'"),  # 500
    ("call/v2/submit", {"box": BOX}, 400, "needs the argument 'system'"),  # 500
    ("call/v2/nope", {}, 404, "no API endpoint named 'nope'"),  # 500
    ("call/submit", b'{"data": ["\xff"]}', 400, "not valid JSON"),  # 400
    # values of the wrong type or range: 200, then a traceback and an error event
    ("call/submit", {"data": ["hi", None, *SETTINGS]}, 400, "UploadedFilesTextbox value is"),
    ("call/submit", {"data": [{"text": "hi", "files": "a.png"}, None, *SETTINGS]}, 400,
     "value is malformed (Input should be a valid list)"),
    ("queue/join", join("SUBMIT", [BOX, None, "", "hot", *SETTINGS[2:]]), 400,
     "submit's Temperature value must be a number from 0 to 2, got 'hot'"),
    ("call/submit", {"data": [BOX, None, "", 0.0, 1.0, 0, 4, "", False]}, 400,
     "Max new tokens value must be a number from 16 to 8192, got 4"),
    ("call/v2/submit", {"box": BOX, "system": "", "pdf_pages": "", "top_p": None}, 400,
     "Top-p value must be a number"),
]


@pytest.mark.parametrize("route, body, status, words", CASES)
def test_malformed_event_bodies_get_a_short_4xx(url, submit_index, capfd, route, body, status,
                                                words):
    if isinstance(body, dict) and body.get("fn_index") == "SUBMIT":
        body = {**body, "fn_index": submit_index}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/gradio_api/{route}", content=content, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and len(r.content) < 600
    assert r.json()["detail"] == error["message"]  # what Gradio's browser client shows
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("route", ["queue/join", "call/submit", "run/submit"])
def test_a_body_over_the_upload_limit_gets_413(url, capfd, route):
    big = json.dumps({"data": ["x" * (UPLOAD_MB * 2**20)], "fn_index": 1, "session_hash": "s1"})
    r = httpx.post(f"{url}/gradio_api/{route}", content=big, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 1 MiB" in r.json()["error"]["message"]
    assert "Traceback" not in capfd.readouterr().err  # 200 and a queued 1 MiB prompt before


def test_well_formed_events_still_run_after_malformed_ones(url, submit_index, capfd):
    for body in (b"{", json.dumps(join(99_999, [])).encode()):
        assert httpx.post(f"{url}/gradio_api/queue/join", content=body, timeout=30).is_client_error
    r = httpx.post(f"{url}/gradio_api/call/submit", json={"data": [BOX, None, *SETTINGS]},
                   timeout=30)
    assert r.status_code == 200, r.text
    events = httpx.get(f"{url}/gradio_api/call/submit/{r.json()['event_id']}", timeout=60).text
    assert "event: complete" in events
    r = httpx.post(f"{url}/gradio_api/call/v2/submit", timeout=30,
                   json={"box": BOX, "system": "", "pdf_pages": "", "max_new_tokens": 16})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/gradio_api/queue/join", timeout=30,
                   json=join(submit_index, [BOX, None, *SETTINGS]))
    assert r.status_code == 200 and r.json()["event_id"]
    assert "Traceback" not in capfd.readouterr().err
