"""Property-based fuzzing of the OpenAI request parser (hypothesis, a bounded budget).

Every input, from raw bytes to near-valid requests, ends as a ChatRequest or an APIError; a
ChatRequest's options are always ones the sampler and the worker accept.
"""

import json

import pytest
import torch

from app_support import import_app

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kimivl_local.engine.sampling import Sampler, SamplingParams

request = import_app("openai_request")
LOGITS = torch.tensor([0.5, 2.0, -1.0, 1.5])
DEFAULTS = {"temperature": 0.2, "top_p": 1.0, "max_new_tokens": 64}
BUDGET = settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.text(max_size=8)
           | st.integers(min_value=-2**70, max_value=2**70) | st.sampled_from([10**400, -10**400])
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([1e-300, 5e-324, -0.0, 2**64, 2**64 - 1, -2**63, -2**63 - 1]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)

roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", ""]) | values
texts = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10) | values})
images = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
    {"url": st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,",
                             "data:,abc", "data:image/png;base64,@@", "http://x/y.png"])
     | values})})
contents = st.text(max_size=10) | st.lists(texts | images | values, max_size=3) | values
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": contents}) | values,
                    max_size=3) | values
FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "n",
          "stream", "stream_options", "stop", "tools", "functions", "logprobs", "logit_bias",
          "response_format", "frequency_penalty", "presence_penalty", "model", "user"]
requests = st.fixed_dictionaries({"messages": messages},
                                 optional={name: values | st.just({"include_usage": True})
                                           for name in FIELDS})


def check(body) -> None:
    try:
        req = request.parse_chat_request(body, DEFAULTS)
    except request.APIError as exc:
        assert exc.status == 400 and exc.message
        assert len(json.dumps(exc.body())) < 2000  # bounded, whatever the input
        return
    o = req.options
    params = SamplingParams(o["temperature"], o["top_p"], o["top_k"], o["seed"])  # accepted as is
    assert Sampler(params)(LOGITS) in range(len(LOGITS))  # and sampled from, never NaN
    assert type(o["max_new_tokens"]) is int and o["max_new_tokens"] >= 1
    if o["seed"] is not None:
        torch.Generator().manual_seed(o["seed"])
    assert req.messages and all(m["role"] in ("system", "user", "assistant") for m in req.messages)
    for m in req.messages:
        assert isinstance(m["content"], str) or all(
            isinstance(p, dict) and p["type"] in ("text", "image_url") for p in m["content"])
    assert isinstance(req.stream, bool) and isinstance(req.include_usage, bool)
    assert all(isinstance(s, str) and s for s in req.stop)


@BUDGET
@given(requests)
def test_near_valid_requests(body):
    check(body)


@BUDGET
@given(values)
def test_any_json_value(body):
    check(body)


@BUDGET
@given(st.binary(max_size=64) | requests.map(lambda b: json.dumps(b, default=str).encode()))
def test_any_bytes(raw):
    try:
        body = request.parse_json(raw)
    except request.APIError as exc:
        assert exc.status == 400
        return
    check(body)
