"""The GPU code paths traced on the CPU with fake CUDA tensors (tests/fake_cuda.py): loading and
planning a quantized checkpoint onto device cuda, prefill, and the decode step
that DecodeGraph captures, shape-, dtype- and device-correct, with every custom op running its
register_fake and no compiled kernel launched.

What this cannot check on a CPU-only torch: numbers (fake tensors hold none), the kernels
themselves, CUDA streams and graph capture/replay (torch.cuda.Stream and CUDAGraph need the CUDA
runtime), memory actually allocated, and any code that reads a device value on the host (fake
tensors have no values; the one such read on the GPU path, RotaryTable.get's positions.max() in
prefill, is skipped here by pre-growing the table, as DecodeGraph.capture does for decode).
Not traced: the vision tower. MoonViT's forward reads its grid sizes with grid_hws.tolist() from
a host tensor, and under FakeTensorMode (torch 2.13, CPU build) that call fails ("tolist()
shouldn't be called on a tensor with unallocated storage") although the tensor is a real CPU
one; tests/test_gpu_model.py runs the tower on a real GPU instead.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import kimivl_local
from kimivl_local.engine.cuda_graph import graph_blocker
from kimivl_local.model.layers import RotaryTable
from kimivl_local.model.quantized import QuantExperts, QuantLinear
from kimivl_local.quant.cuda_layout import CudaQuantWeight

from fake_cuda import CUDA, DeviceWork, fake_cuda

CONTEXT = 256


@pytest.fixture
def fake_gpu_model(quantized, monkeypatch):
    monkeypatch.setenv("KIMIVL_CUDA_GRAPHS", "0")  # capture needs the CUDA runtime
    path = quantized("default")
    with fake_cuda(monkeypatch):
        api = kimivl_local.load(path, device="cuda", dtype=torch.bfloat16, max_context=CONTEXT)
        lm = api.model.language_model
        lm.rope.ensure(CONTEXT, api.device)
        get = RotaryTable.get
        monkeypatch.setattr(RotaryTable, "get", lambda self, p, grow=True: get(self, p, False))
        yield api


def _ops(work: DeviceWork) -> set[str]:
    return {op.split(" ")[0] for op in work.host_ops}


def test_loading_and_planning_put_every_weight_on_the_gpu(fake_gpu_model):
    api = fake_gpu_model
    plan = api.memory_plan.placement
    assert plan.device == CUDA and plan.embeddings_on_host and not plan.cpu_expert_layers
    for name, p in api.model.named_parameters():
        if "embed_tokens" in name:
            assert p.device.type == "cpu" and not isinstance(p, FakeTensor), name
            continue
        assert isinstance(p, FakeTensor) and p.device == CUDA, name
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert p.dtype == want, name
    quant = [m for m in api.model.modules() if isinstance(m, (QuantLinear, QuantExperts))]
    weights = [m.qweight for m in quant if isinstance(m, QuantLinear) and m.on_kernel]
    weights += [w for m in quant if isinstance(m, QuantExperts) for w in (m.w13, m.w2)]
    assert len(weights) >= 8 and all(isinstance(w, CudaQuantWeight) for w in weights)
    assert all(w.qweight.device == CUDA and w.scales.device == CUDA for w in weights)
    kv = api.engine.cache.kv
    cfg = api.config.text
    assert kv.device == CUDA and kv.dtype == torch.bfloat16
    assert kv.shape == (cfg.num_hidden_layers, CONTEXT, cfg.latent_dim)


def test_prefill_runs_on_the_gpu(fake_gpu_model):
    api = fake_gpu_model
    ids = api.tokenizer.encode_chat([{"role": "user", "content": "Hello there, how are you?"}])
    with DeviceWork() as work:
        logits, reused = api.engine.prefill(ids)
    assert logits.shape == (api.config.text.vocab_size,) and logits.dtype == torch.float32
    assert logits.device == CUDA and reused == 0
    assert work.ops > 100
    # The host's part: the embedding lookup (the table stays in host memory), its copy to the
    # GPU, and small constants (cu_seqlens bounds) made on the host and copied over.
    assert _ops(work) <= {"aten.embedding.default", "aten._to_copy.default", "aten.slice.Tensor",
                          "aten.to.dtype_layout", "aten.lift_fresh.default", "aten.detach_.default",
                          "prim.device.default"}, work.host_ops


def test_decode_step_is_capturable(fake_gpu_model, monkeypatch):
    """What DecodeGraph.capture records: embeds and position already on the device, every op on
    the GPU, every value read on the device, through the CUDA custom ops."""
    api = fake_gpu_model
    lm, kv = api.model.language_model, api.engine.cache.kv
    monkeypatch.delenv("KIMIVL_CUDA_GRAPHS")
    assert graph_blocker(lm, kv) is None
    embeds = torch.zeros(1, lm.config.hidden_size, dtype=lm.dtype, device=CUDA)
    where = torch.full((1,), 7, dtype=torch.int64, device=CUDA)
    seen = []
    with DeviceWork() as work:
        with _record(seen):
            logits = lm.logits(lm.decode_hidden(embeds, where, kv))
    assert work.host_ops == []
    assert logits.shape == (1, lm.config.vocab_size) and logits.dtype == torch.float32
    assert logits.device == CUDA
    for op in ("kimivl.cuda_quant_matmul", "kimivl.cuda_moe_block", "kimivl.mla_decode"):
        assert any(op in s for s in seen), (op, sorted(set(seen)))


def test_engine_decode_step_on_the_gpu(fake_gpu_model):
    """Eagerly (no CUDA runtime to capture with): only the new token's id and embedding row
    cross from the host."""
    api = fake_gpu_model
    api.engine.prefill(api.tokenizer.encode("Hello"))
    with DeviceWork() as work:
        logits = api.engine.decode_step(5)
    assert logits.shape == (api.config.text.vocab_size,) and logits.device == CUDA
    assert _ops(work) <= {"aten.embedding.default", "aten._to_copy.default",
                          "aten.to.dtype_layout", "aten.lift_fresh.default",
                          "aten.detach_.default", "prim.device.default"}, work.host_ops


class _record(DeviceWork):
    """Names of every op dispatched under it."""

    def __init__(self, names: list):
        super().__init__()
        self.names = names

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.slow  # quantizes Kimi's real MoE weights (64 experts) on the CPU: ~1-2 minutes
def test_the_cuda_selftest_cases_trace(monkeypatch):
    """`kimivl-local selftest --device cuda` builds its cases (Kimi's real MoE shapes among them)
    and every one reaches its op's CUDA custom op with the expected output."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from kimivl_local.cli import selftest
    from kimivl_local.quant import cuda_layout

    def on_host(fn):  # random weights and their quantization: real values on the CPU
        def run(*args, **kwargs):
            with unset_fake_temporarily():
                return fn(*args, **kwargs)
        return run

    with fake_cuda(monkeypatch):
        for name in ("_rand", "_packed", "to_cpu_layout", "concat_out_features"):
            monkeypatch.setattr(selftest, name, on_host(getattr(selftest, name)))
        monkeypatch.setattr(selftest, "to_cuda_layout", cuda_layout.to_cuda_layout)
        cases = selftest.cases(CUDA)
        seen = []
        with _record(seen):
            outputs = [case.run() for case in cases]
    ops = {c.op for c in cases}
    assert ops == {"quant_matmul", "moe_block", "varlen_attention", "mla_decode"}
    assert all(c.kernel.startswith("cuda_") for c in cases)
    for case, y in zip(cases, outputs):
        assert y.device == CUDA, case.shape
        assert y.dtype == (torch.float32 if case.op == "mla_decode" else torch.bfloat16)
    for op in ("cuda_quant_matmul", "cuda_moe_block", "varlen_attention", "mla_decode"):
        assert sum(f"kimivl.{op}" in s for s in seen) == sum(c.kernel == f"cuda_{op}"
                                                             or c.kernel == op for c in cases)
