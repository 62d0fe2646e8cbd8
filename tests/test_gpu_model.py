"""The whole model on CUDA as users run it: a quantized checkpoint (default and int4 recipes) in
bfloat16, so QuantLinear/QuantExperts run the CUDA kernels, prefill and the vision tower the
varlen attention kernel, decode MLA decode and a captured CUDA graph.

Bounds (relative Frobenius error of the fp32 logits or features):
  * against the CPU reference backend in fp32 (dequantized weights, torch ops): bf16 rounds
    every activation to 8 bits (<= 2^-9 relative, ~0.2% rms per op), about what int8 activations
    cost the CPU kernels (<= 0.4% per linear); this random tiny model amplifies per-op error ~7x
    through its layers (test_quant_runtime measured 2.8% for the CPU kernels), so 8e-2 leaves
    room for bf16 norms, softmax and residuals, while a wrong kernel or layout gives O(1);
  * vision features, CUDA bf16 against the CPU fp32 tower: 2 blocks, same reasoning, 3e-2;
  * --cpu-experts: the host layers run the CPU kernels (int8 activations) instead of the CUDA
    ones; both in bf16: 5e-2 (test_memory_plan allows 2e-2 in fp32).
"""

import pytest
import torch
from PIL import Image

import kimivl_local
from kimivl_local.engine.cuda_graph import DecodeGraph
from kimivl_local.engine.generate import Engine
from kimivl_local.engine.memory_plan import CUDA_RESERVE
from kimivl_local.engine.sampling import SamplingParams
from kimivl_local.kernels.bridge import kernel, set_backend
from kimivl_local.kernels.extension import extension
from kimivl_local.model.quantized import QuantExperts, QuantLinear

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4 + "请用三句话介绍长城。"
RECIPES = ["default", "int4"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def _ids(api) -> torch.Tensor:
    return torch.tensor(api.tokenizer.encode_chat([{"role": "user", "content": PROMPT}]))


def _logits(api, ids: torch.Tensor) -> torch.Tensor:
    lm = api.model.language_model
    with torch.inference_mode():
        return lm.logits(lm.hidden_states(api.model.embed(ids.to(api.device)))).float().cpu()


def _cuda(path, **kw):
    return kimivl_local.load(path, device="cuda", dtype=torch.bfloat16, **kw)


class _Calls:
    """Count calls of `_C.<name>` (the ops look kernels up by name at each call)."""

    def __init__(self, monkeypatch, name: str):
        real = getattr(extension(), name)
        self.n = 0

        def spy(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(extension(), name, spy)


@pytest.fixture(scope="module")
def cuda_build():
    if kernel("cuda_quant_matmul") is None or kernel("cuda_varlen_attention") is None:
        pytest.fail("a CUDA device but no CUDA kernels in _C: build with KIMIVL_CUDA=on")


@pytest.fixture(scope="module")
def reference_logits(quantized):
    """recipe -> (ids, fp32 logits of the CPU reference backend)."""
    out = {}
    try:
        for recipe in RECIPES:
            ref = kimivl_local.load(quantized(recipe), device="cpu", dtype=torch.float32,
                                    backend="reference")
            ids = _ids(ref)
            out[recipe] = ids, _logits(ref, ids)
    finally:
        set_backend("auto")
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_logits_match_the_cpu_reference(quantized, reference_logits, cuda_build, recipe,
                                        monkeypatch):
    api = _cuda(quantized(recipe))
    layers = [(n, m) for n, m in api.model.named_modules()
              if isinstance(m, (QuantLinear, QuantExperts))]
    assert layers
    for name, m in layers:  # kv_b_proj is dequantized at load (MLA's decode reads it dense)
        if isinstance(m, QuantLinear) and m.dense_at_load:
            continue
        where = m.qweight.qweight.device if isinstance(m, QuantLinear) else m.device
        assert m.on_kernel and where.type == "cuda", name
    matmuls = _Calls(monkeypatch, "cuda_quant_matmul")
    moe = _Calls(monkeypatch, "cuda_moe_block")
    ids, want = reference_logits[recipe]
    got = _logits(api, ids)
    assert matmuls.n > 0 and moe.n > 0  # the kernels ran, not a torch fallback
    assert torch.isfinite(got).all()
    assert _rel(got, want) < 8e-2


@pytest.mark.parametrize("recipe", RECIPES)
def test_greedy_generation_with_cuda_graphs_equals_eager(quantized, cuda_build, recipe,
                                                         monkeypatch):
    api = _cuda(quantized(recipe), max_context=512)
    ids = _ids(api).tolist()
    graphed = Engine(api.model, 512)
    with_graph = list(graphed.generate(ids, max_new_tokens=24, sampling=GREEDY, stop_ids=set()))
    assert isinstance(graphed.graph, DecodeGraph), "the decode step was not captured"
    monkeypatch.setenv("KIMIVL_CUDA_GRAPHS", "0")
    eager = Engine(api.model, 512)
    without = list(eager.generate(ids, max_new_tokens=24, sampling=GREEDY, stop_ids=set()))
    assert eager.graph is False
    assert with_graph == without
    # one more step each from the same position: the replayed logits are the eager ones
    # (up to the summation order of a different context split)
    a, b = graphed.decode_step(with_graph[-1]), eager.decode_step(without[-1])
    assert _rel(a, b) < 1e-2


def test_vision_tower_on_cuda_matches_the_cpu(quantized, cuda_build, monkeypatch):
    rng = torch.Generator().manual_seed(3)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=rng) * 255).byte().numpy())
              for h, w in ((84, 56), (70, 126))]  # two sizes: packed sequences of two lengths
    cpu = kimivl_local.load(quantized("default"), device="cpu", dtype=torch.float32)
    want = cpu.image_features(images)
    api = _cuda(quantized("default"))
    calls = _Calls(monkeypatch, "cuda_varlen_attention")
    got = api.image_features(images)
    assert calls.n > 0  # MoonViT's attention ran the CUDA kernel (head dim 12: not 8-aligned)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert g.device.type == "cuda" and torch.isfinite(g).all()
        assert _rel(g, w) < 3e-2


def test_cpu_experts_equal_all_on_gpu(quantized, cuda_build):
    path = quantized("default")
    full = _cuda(path, cpu_experts=0)
    hybrid = _cuda(path, cpu_experts=2)
    layers = hybrid.memory_plan.placement.cpu_expert_layers
    assert len(layers) == 2
    experts = {n: m for n, m in hybrid.model.named_modules() if isinstance(m, QuantExperts)}
    assert sorted(n for n, m in experts.items() if m.device.type == "cpu") == \
        [f"language_model.model.layers.{i}.mlp.experts" for i in layers]
    ids = _ids(full)
    assert _rel(_logits(hybrid, ids), _logits(full, ids)) < 5e-2
    engine = Engine(hybrid.model, 256)
    tokens = list(engine.generate(ids.tolist(), max_new_tokens=4, sampling=GREEDY,
                                  stop_ids=set()))
    assert len(tokens) == 4 and engine.graph is False  # host experts: eager decoding


def test_planned_gpu_memory_bounds_a_long_prefill(quantized, cuda_build):
    """The plan, made before any weight is read, must cover what a prefill of nearly the whole
    context allocates; and what stays resident after loading is the planned weights and cache."""
    context = 4096
    api = _cuda(quantized("default"), max_context=context)
    plan = api.memory_plan
    dev = api.device
    torch.cuda.synchronize(dev)
    resident = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    ids = (_ids(api).tolist() * context)[:context - 8]
    logits, _ = api.engine.prefill(ids)
    api.engine.decode_step(int(logits.argmax()))
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    assert peak <= plan.device_total, (peak, plan.summary())
    assert peak - resident <= plan.activations + CUDA_RESERVE, (peak, resident, plan.summary())
    resident_planned = plan.device_weights + plan.kv_cache
    assert 0.9 * resident_planned <= resident <= 1.1 * resident_planned + (16 << 20), \
        (resident, plan.summary())
