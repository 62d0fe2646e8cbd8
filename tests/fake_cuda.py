"""Fake CUDA on a CPU-only torch, for tracing the GPU code paths without a GPU.

torch's FakeTensorMode gives tensors on device "cuda" whose ops produce the right shapes, dtypes
and devices without computing; our custom ops run their register_fake implementations. Three
things a CPU-only torch cannot do under it, and how `fake_cuda()` gets past them:
  * `t[i]` / `t[i] = v` on a CUDA tensor: Python indexing builds a CUDA device guard in C++
    before dispatch ("PyTorch is not linked with support for cuda devices"). `CudaIndexing`
    intercepts them at the __torch_function__ level and issues the equivalent aten ops
    (as_strided for basic indexing, aten.index for one index tensor).
  * real tensors meeting fake ones: fake mode constant-folds some ops on real inputs by running
    them for real, which fails for a CUDA destination. Checkpoint reads run outside fake mode
    (real values: the loader validates them), and `CudaIndexing` turns a real tensor's move to
    CUDA into a fake CUDA tensor explicitly.
  * the CUDA runtime: torch.cuda's queries (is_available, mem_get_info, capability, device
    properties) are patched to an 80 GB sm_90 device; streams and CUDA graphs cannot be faked.
The compiled kernels are replaced by functions that fail if called: under fake mode every CUDA
op must go through its registered fake, never launch.
"""

from __future__ import annotations

import types
from contextlib import ExitStack, contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA = torch.device("cuda", 0)
GiB = 1 << 30
CUDA_KERNELS = ("cuda_quant_matmul", "cuda_moe_block", "cuda_varlen_attention", "cuda_mla_decode")


def _is_fake_cuda(t) -> bool:
    return isinstance(t, FakeTensor) and t.device.type == "cuda"


def _indexed(device) -> torch.device:
    device = torch.device(device)
    return torch.device(device.type, device.index or 0)


def _cuda_target(args, kwargs) -> bool:
    dev = kwargs.get("device")
    if dev is None:
        dev = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
    return dev is not None and torch.device(dev).type == "cuda"


class CudaIndexing(TorchFunctionMode):
    def __init__(self, mode: FakeTensorMode):
        super().__init__()
        self.mode = mode

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and _is_fake_cuda(args[0]):
            return _getitem(*args)
        if func is torch.Tensor.__setitem__ and _is_fake_cuda(args[0]):
            t, index, value = args
            torch.ops.aten.copy_.default(_getitem(t, index), value)
            return None
        if func is torch.Tensor.copy_ and _is_fake_cuda(args[0]):
            return torch.ops.aten.copy_.default(*args, **kwargs)
        if func is torch.tensor and _cuda_target((None,), kwargs):
            device = kwargs.pop("device")
            with unset_fake_temporarily():
                host = torch.tensor(*args, **kwargs)
            return torch.ops.aten._to_copy.default(self.mode.from_tensor(host),
                                                   device=_indexed(device))
        if func is torch.Tensor.to and _cuda_target(args, kwargs):
            t = args[0] if isinstance(args[0], FakeTensor) else self.mode.from_tensor(args[0])
            if t.constant is not None:  # fake mode would constant-fold the move, for real
                t = torch.empty(t.shape, dtype=t.dtype, device=t.device)
            return func(t, *args[1:], **kwargs)
        return func(*args, **kwargs)


def _getitem(t: torch.Tensor, index):
    index = index if isinstance(index, tuple) else (index,)
    tensors = [i for i in index if isinstance(i, torch.Tensor)]
    if not tensors:  # a view: work out its geometry on a meta tensor, then take it
        with unset_fake_temporarily():
            base = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            view = base[index]
        return t.as_strided(view.shape, view.stride(), t.storage_offset() + view.storage_offset())
    lead = 0
    for i in index:
        if isinstance(i, torch.Tensor):
            break
        if i != slice(None):
            raise NotImplementedError(f"fake CUDA indexing with {index}")
        lead += 1
    if len(tensors) != 1 or index[lead + 1:] not in ((), (Ellipsis,)):
        raise NotImplementedError(f"fake CUDA indexing with {index}")
    return torch.ops.aten.index.Tensor(t, [None] * lead + [tensors[0]])


class DeviceWork(TorchDispatchMode):
    """Records every op under it that touches a CPU tensor or reads a value on the host (the
    things that break a CUDA graph capture or stall the GPU)."""

    def __init__(self):
        super().__init__()
        self.host_ops: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.host_ops.append(f"{func}: reads a device value on the host")
        out = func(*args, **kwargs)
        devices = {t.device.type for t in tree_leaves((args, kwargs, out))
                   if isinstance(t, torch.Tensor)}
        if "cpu" in devices:
            self.host_ops.append(f"{func} on {sorted(devices)}")
        return out


def _cuda_queries(monkeypatch) -> None:
    props = types.SimpleNamespace(name="fake sm_90", major=9, minor=0, total_memory=80 * GiB,
                                  multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: props.name)


def _fake_extension(monkeypatch) -> None:
    """_C as the ops see it: the real module plus CUDA entry points that must never run."""
    from kimivl_local.kernels import bridge as _bridge
    from kimivl_local.kernels.extension import extension

    real = extension()

    def launched(*args, **kwargs):
        raise AssertionError("a CUDA kernel was launched under fake tracing")

    names = {n: getattr(real, n) for n in dir(real) if not n.startswith("__")} if real else {}
    fake = types.SimpleNamespace(**names)
    for name in CUDA_KERNELS:
        setattr(fake, name, launched)
    fake.cuda_moe_workspace_bytes = lambda *args: 0
    monkeypatch.setattr(_bridge, "extension", lambda: fake)


def _real_reads(monkeypatch) -> None:
    """Checkpoint reads, the checks of packed weights and the CUDA weight-layout conversion
    compute real values on the CPU (the loader validates them); only moving to the device is
    fake."""
    from kimivl_local.checkpoint.shards import Checkpoint
    from kimivl_local.model import quantized as qmod
    from kimivl_local.quant import cuda_layout

    def real(fn):
        def run(*args, **kwargs):
            with unset_fake_temporarily():
                return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(Checkpoint, "load", real(Checkpoint.load))
    for name in ("read_packed", "stack_experts", "concat_out_features", "dequantize"):
        monkeypatch.setattr(qmod, name, real(getattr(qmod, name)))
    convert = real(cuda_layout.to_cuda_layout)
    monkeypatch.setattr(cuda_layout, "to_cuda_layout",
                        lambda packed, device="cuda": _move_layout(convert(packed, "cpu"), device))


def _move_layout(w, device):
    import dataclasses

    return dataclasses.replace(w, qweight=w.qweight.to(device), scales=w.scales.to(device),
                               zeros=None if w.zeros is None else w.zeros.to(device))


@contextmanager
def fake_cuda(monkeypatch):
    """Inside: torch.device("cuda") tensors are fake, torch.cuda reports one 80 GB sm_90 GPU,
    and our CUDA kernels exist (but fail if launched)."""
    _cuda_queries(monkeypatch)
    _fake_extension(monkeypatch)
    _real_reads(monkeypatch)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with ExitStack() as stack:
        stack.enter_context(mode)
        stack.enter_context(CudaIndexing(mode))
        yield mode
