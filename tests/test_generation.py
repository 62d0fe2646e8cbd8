"""Generation: sampling rules, stop tokens, context limits, thinking separation."""

import pytest
import torch

import kimivl_local
from kimivl_local.engine.generate import Engine
from kimivl_local.engine.sampling import Sampler, SamplingParams
from kimivl_local.errors import ContextLengthError, InputError, NonFiniteLogitsError
from kimivl_local.inputs.thinking import ThinkingSplitter, split_thinking

NAN, INF = float("nan"), float("inf")


def _draws(params, logits, n=2000):
    sampler = Sampler(params)
    return torch.tensor([sampler(logits) for _ in range(n)])


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams())(logits) == 1


def test_top_k_restricts_to_k_best():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    draws = _draws(SamplingParams(temperature=1.0, top_k=2, seed=0), logits)
    assert set(draws.tolist()) == {0, 1}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # top_p 0.7: 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7 -> tokens {0, 1}, renormalised to 5/8, 3/8.
    draws = _draws(SamplingParams(temperature=1.0, top_p=0.7, seed=1), probs.log(), n=4000)
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.03)


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0])
    hot = (_draws(SamplingParams(temperature=2.0, seed=2), logits) == 0).float().mean()
    cold = (_draws(SamplingParams(temperature=0.25, seed=2), logits) == 0).float().mean()
    assert cold > 0.95 > hot > 0.5


def test_seed_reproducible():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    a = _draws(SamplingParams(temperature=1.0, seed=42), logits, n=50)
    b = _draws(SamplingParams(temperature=1.0, seed=42), logits, n=50)
    assert torch.equal(a, b)


def test_bad_sampling_params():
    for kwargs in ({"temperature": -0.1}, {"temperature": NAN}, {"temperature": INF},
                   {"top_p": -0.1}, {"top_p": 1.5}, {"top_p": NAN}, {"top_k": -1}):
        with pytest.raises(InputError):
            SamplingParams(**kwargs)


SAMPLERS = [SamplingParams(), SamplingParams(temperature=1.0, seed=0),
            SamplingParams(temperature=0.7, top_k=3, top_p=0.9, seed=0)]


@pytest.mark.parametrize("params", SAMPLERS)
@pytest.mark.parametrize("bad", [[0.5, NAN, 1.0, 0.2], [NAN] * 4, [0.5, INF, 1.0, 0.2],
                                 [-INF] * 4, [NAN, INF, -INF, 0.0]])
def test_non_finite_logits_stop_with_a_clear_error(params, bad):
    with pytest.raises(NonFiniteLogitsError, match="NaN or infinite logits"):
        Sampler(params)(torch.tensor(bad))


@pytest.mark.gpu
@pytest.mark.parametrize("params", SAMPLERS)
def test_non_finite_logits_on_cuda_leave_the_device_usable(params):
    # multinomial on NaN probabilities is a device-side assert on CUDA, which would poison the
    # context for every later request; the sampler must never hand it one.
    with pytest.raises(NonFiniteLogitsError):
        Sampler(params, "cuda")(torch.tensor([0.5, NAN, 1.0], device="cuda"))
    assert Sampler(params, "cuda")(torch.tensor([0.0, 5.0, -INF], device="cuda")) in (0, 1)
    torch.cuda.synchronize()


@pytest.mark.parametrize("params", SAMPLERS)
def test_masked_logits_still_sample(params):
    # -inf on some tokens is a valid mask, not broken logits.
    assert Sampler(params)(torch.tensor([-INF, 2.0, -INF, 1.0])) in (1, 3)


@pytest.mark.parametrize("temperature, top_p", [
    (0.99e-4, 1.0), (1e-30, 1.0), (1e-45, 1e-9), (5e-324, 1.0),  # vanishing temperature
    (1.0, 0.99e-6), (1.0, 1e-320), (1.0, 5e-324), (1.0, 0.0)])  # vanishing top_p
def test_vanishing_temperature_or_top_p_is_greedy_not_nan(temperature, top_p):
    """Below MIN_TEMPERATURE or MIN_TOP_P (the limits of both) the sampler takes the argmax,
    even where sampling would split a near-tie (token 2 is one fp32 step below token 1) or a
    top_p that rounds to 0 in fp32 would drop every token."""
    logits = torch.tensor([1.0, 3.0, 3.0, -5.0])
    logits[2] = logits[2].nextafter(torch.tensor(0.0))
    draws = _draws(SamplingParams(temperature=temperature, top_p=top_p, seed=0), logits, n=200)
    assert set(draws.tolist()) == {1}


def test_model_with_nan_weights_stops_without_streaming(tiny_checkpoint):
    model = kimivl_local.load(tiny_checkpoint, device="cpu", dtype=torch.float32)
    model.model.language_model.model.norm.weight.data[0] = NAN
    pieces = []
    with pytest.raises(NonFiniteLogitsError):
        for piece in model.generate([{"role": "user", "content": "hello"}], max_new_tokens=4):
            pieces.append(piece)
    assert pieces == []  # nothing (e.g. the NUL characters of token 0) was streamed


def test_stops_on_stop_token_and_counts(tiny_model_fp32):
    ids = tiny_model_fp32.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    engine = Engine(tiny_model_fp32.model, max_context=128)
    free = list(engine.generate(ids, max_new_tokens=6, sampling=SamplingParams(), stop_ids=set()))
    assert len(free) == 6 and engine.stats.finish_reason == "length"
    # Make a later greedy token a stop token: generation ends before it and does not yield it.
    j = next(j for j in range(1, 6) if free[j] not in free[:j])
    stopped = list(engine.generate(ids, max_new_tokens=6, sampling=SamplingParams(),
                                   stop_ids={free[j]}))
    assert stopped == free[:j] and engine.stats.finish_reason == "stop"


def test_model_stops_on_im_end_and_eos(tiny_model_fp32):
    tok = tiny_model_fp32.tokenizer
    assert {tok.im_end_id, tok.eos_id} <= tiny_model_fp32.stop_ids


def test_generation_fills_context_then_stops(tiny_model_fp32):
    engine = Engine(tiny_model_fp32.model, max_context=20)
    out = list(engine.generate(list(range(15)), max_new_tokens=50, sampling=SamplingParams(),
                               stop_ids=set()))
    assert engine.stats.finish_reason == "context" and len(out) == 6  # 15 + 5 cached + 1 sampled


def test_prompt_longer_than_context(tiny_model_fp32):
    engine = Engine(tiny_model_fp32.model, max_context=20)
    with pytest.raises(ContextLengthError, match="20"):
        engine.prefill(list(range(25)))


def test_split_thinking():
    assert split_thinking("◁think▷ a plan ◁/think▷ The answer.") == ("a plan", "The answer.")
    assert split_thinking("Just an answer.") == ("", "Just an answer.")
    assert split_thinking("◁think▷ unfinished") == ("unfinished", "")


@pytest.mark.parametrize("cut", range(1, 12))
def test_thinking_splitter_streams_markers_cut_anywhere(cut):
    text = "◁think▷reason ◁ok▷◁/think▷answer ◁think▷ stays"
    pieces = [text[i:i + cut] for i in range(0, len(text), cut)]
    splitter, out = ThinkingSplitter(), []
    for piece in pieces:
        out += list(splitter.feed(piece))
    out += list(splitter.flush())
    thinking = "".join(t for c, t in out if c == "thinking")
    answer = "".join(t for c, t in out if c == "answer")
    assert thinking == "reason ◁ok▷"
    assert answer == "answer ◁think▷ stays"  # only one thinking block, at the start


def test_generate_drops_old_thinking_from_history(tiny_model_fp32):
    tok = tiny_model_fp32.tokenizer
    from kimivl_local.api import _drop_old_thinking

    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "◁think▷ long reasoning ◁/think▷ short"},
                {"role": "user", "content": "q2"}]
    rendered = tok.render_chat(_drop_old_thinking(messages))
    assert "long reasoning" not in rendered and "short" in rendered


def test_cpu_prefill_runs_torch_on_one_thread_and_restores_it(tiny_model_fp32, monkeypatch):
    """Prefill runs torch's glue on one thread (kernels keep theirs) and gives the count back,
    also when the prompt is refused."""
    engine = Engine(tiny_model_fp32.model, max_context=20)
    lm = tiny_model_fp32.model.language_model
    seen, hidden_states = [], lm.hidden_states

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return hidden_states(*args, **kwargs)

    monkeypatch.setattr(lm, "hidden_states", spy)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        logits, _ = engine.prefill(list(range(10)))
        assert seen == [1] and torch.isfinite(logits).all() and torch.get_num_threads() == 2
        with pytest.raises(ContextLengthError):
            engine.prefill(list(range(25)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
