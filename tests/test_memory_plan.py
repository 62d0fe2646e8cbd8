"""The memory planner (kimivl_local.engine.memory_plan): placement, sizes, and the refusals that
replace an out-of-memory crash. Device memory is passed in, so GPU plans are checked on any
machine."""

import pytest
import torch

import kimivl_local
from kimivl_local.checkpoint.config import KimiVLConfig
from kimivl_local.engine.memory_plan import (GiB, MemoryPlanError, Placement, expert_layer,
                                             plan_memory)
from kimivl_local.model.kimivl import KimiVLForConditionalGeneration
from kimivl_local.model.quantized import QuantExperts, QuantLinear, swap_modules
from kimivl_local.quant.qconfig import QuantizationConfig
from kimivl_local.synthetic.checkpoint import build_configs

# `kimivl-local quantize --recipe default`: routed experts INT4 g128, the other linears of the
# language model INT8 per channel (kv_b_proj is dequantized at load, as MLA's decode reads it).
DEFAULT_RECIPE = {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "config_groups": {
        "group_0": {"targets": [r"re:.*\.mlp\.experts\.\d+\.(gate|up|down)_proj$"],
                    "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                "strategy": "group", "group_size": 128}},
        "group_1": {"targets": [r"re:.*\.mlp\.shared_experts\.(gate|up|down)_proj$",
                                r"re:.*\.self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)$",
                                r"re:.*\.layers\.\d+\.mlp\.(gate|up|down)_proj$",
                                r"re:^language_model\.lm_head$"],
                    "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                "strategy": "channel", "group_size": None}}}}


def full_model(quantization: dict | None = None):
    """The real-size model (27 layers, 64 experts) on the meta device, as the loader builds it."""
    raw, _ = build_configs("full", None, None)
    if quantization:
        raw["quantization_config"] = quantization
    config = KimiVLConfig.from_dict(raw)
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(config)
    qconfig = QuantizationConfig.from_model_config(raw)
    if qconfig:
        swap_modules(model, config.text, qconfig)
    return model, config


def plan(model, config, **kw):
    kw = {"device": "cuda", "max_context": 32768, "prefill_chunk": 2048, "image_patches": 4096,
          "cuda_available": True, "device_free": 80 * GiB, "host_total": 256 * GiB, **kw}
    return plan_memory(model, config, torch.bfloat16, **kw)


@pytest.fixture(scope="module")
def bf16_full():
    return full_model()


def test_bf16_model_fits_a_big_gpu_with_embeddings_on_the_host(bf16_full):
    p = plan(*bf16_full)
    assert p.placement.device == torch.device("cuda", 0)
    assert p.placement.embeddings_on_host and not p.placement.cpu_expert_layers
    embeddings = 163840 * 2048 * 2
    assert p.host_weights == embeddings
    # 16.4 G parameters in bf16, less the embeddings; plus 27 x 32768 x 576 x 2 bytes of cache
    assert p.device_weights == pytest.approx(16_407_656_048 * 2 - embeddings, rel=0.001)
    assert p.kv_cache == 27 * 32768 * 576 * 2
    assert p.device_total <= 80 * GiB


def test_small_gpu_refusal_names_the_cpu_experts_that_fit(bf16_full):
    with pytest.raises(MemoryPlanError, match=r"does not fit the GPU.*Try --cpu-experts (\d+)") as err:
        plan(*bf16_full, gpu_memory_gb=12)
    n = int(err.value.args[0].split("--cpu-experts ")[1].split()[0].rstrip("."))
    fitting = plan(*bf16_full, gpu_memory_gb=12, cpu_experts=n)
    assert fitting.device_total <= 12 * GiB
    assert fitting.placement.cpu_expert_layers == tuple(range(27 - n, 27))  # the last n MoE layers
    with pytest.raises(MemoryPlanError):
        plan(*bf16_full, gpu_memory_gb=12, cpu_experts=n - 1)
    auto = plan(*bf16_full, device="auto", gpu_memory_gb=12)
    assert len(auto.placement.cpu_expert_layers) == n and "chose --cpu-experts" in auto.summary()


def test_default_recipe_on_a_12_gb_gpu_at_32k_context():
    """What the quantized default is for: a 12 GB GPU at 32K context. Without the CUDA kernels
    in _C the loader would dequantize the layers on the GPU, and the planner says so (it counts
    what the loader will hold)."""
    model, config = full_model(DEFAULT_RECIPE)
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 26
    assert experts[0].resident_bytes(torch.device("cpu"), torch.bfloat16) == \
        64 * 3 * 1408 * 2048 * (0.5 + 2 / 128)
    if experts[0]._kernel_ok(torch.device("cuda", 0), torch.bfloat16):
        p = plan(model, config, gpu_memory_gb=12)
        assert p.placement.cpu_expert_layers == () and p.device_total <= 12 * GiB
        assert 8.5 * GiB < p.device_weights < 9.5 * GiB  # 7.4 GB experts, int8 rest, bf16 vision
    else:
        with pytest.raises(MemoryPlanError, match="Try --cpu-experts"):
            plan(model, config, gpu_memory_gb=12)


def test_nothing_fits_a_tiny_gpu(bf16_full):
    with pytest.raises(MemoryPlanError, match="use --device cpu"):
        plan(*bf16_full, gpu_memory_gb=1)


@pytest.mark.parametrize("kw, message", [
    ({"device": "cuda", "cuda_available": False}, "no CUDA GPU is visible"),
    ({"device": "tpu"}, "--device must be auto, cpu, cuda or cuda:N"),
    ({"gpu_memory_gb": 100}, "more than the 80.00 GB free"),
    ({"gpu_memory_gb": 0}, "--gpu-memory must be a positive"),
    ({"device": "cpu", "cpu_experts": 2}, "needs --device cuda"),
    ({"device": "cpu", "gpu_memory_gb": 8}, "applies to --device cuda"),
    ({"cpu_experts": 27}, "only 26 MoE layers"),
    ({"cpu_experts": -1}, "must be >= 0"),
    ({"max_context": 200_000}, r"--max-context must be in 1..131072"),
])
def test_impossible_settings_are_refused(bf16_full, kw, message):
    with pytest.raises(MemoryPlanError, match=message):
        plan(*bf16_full, **kw)


def test_cpu_plan_refuses_more_than_the_machine_has(bf16_full):
    p = plan(*bf16_full, device="cpu", host_total=64 * GiB)
    assert p.placement == Placement(torch.device("cpu"), vision_fp32=True)
    with pytest.raises(MemoryPlanError, match=r"this machine has 24.00 GB\. Use a quantized"):
        plan(*bf16_full, device="cpu", host_total=24 * GiB)


def test_expert_layer_parsing():
    assert expert_layer("language_model.model.layers.7.mlp.experts") == 7
    assert expert_layer("language_model.model.layers.12.mlp.experts.gate_proj") == 12
    assert expert_layer("language_model.model.layers.7.mlp.shared_experts.up_proj.weight") is None
    assert expert_layer("language_model.model.layers.7.self_attn.q_proj.weight") is None
    gpu = Placement(torch.device("cuda", 0), True, (5,))
    assert gpu.device_of("language_model.model.embed_tokens.weight").type == "cpu"
    assert gpu.device_of("language_model.model.layers.5.mlp.experts.up_proj").type == "cpu"
    assert gpu.device_of("language_model.model.layers.4.mlp.experts.up_proj").type == "cuda"


def test_planned_bytes_match_what_loading_holds(quantized):
    """The planner's weight bytes are what the loaded model holds (CPU layout pads N to 16 and K
    to 32, which the plan does not count: within 2% here)."""
    api = kimivl_local.load(quantized("default"), device="cpu")
    # bf16 model on the CPU: the vision tower and projector are held in fp32 (Placement.vision_fp32)
    assert api.model.vision_tower.patch_embed.proj.weight.dtype == torch.float32
    assert api.model.multi_modal_projector.linear_1.weight.dtype == torch.float32
    assert api.model.language_model.model.norm.weight.dtype == torch.bfloat16
    held = 0
    seen = set()
    for name, m in api.model.named_modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            held += m.nbytes()
            seen.add(name + ".")
    for name, p in api.model.named_parameters():
        if not any(name.startswith(s) for s in seen):
            held += p.numel() * p.element_size()
    assert api.memory_plan.device_weights == pytest.approx(held, rel=0.02)


def test_load_refuses_before_reading_weights(tiny_checkpoint):
    with pytest.raises(MemoryPlanError, match="needs --device cuda"):
        kimivl_local.load(tiny_checkpoint, device="cpu", cpu_experts=1)
    with pytest.raises(MemoryPlanError, match="--max-context must be in 1..8192"):
        kimivl_local.load(tiny_checkpoint, device="cpu", max_context=10_000)


@pytest.mark.gpu
def test_cpu_experts_give_the_same_output(quantized):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    path = quantized("default")
    outputs = []
    for n in (0, 2):
        api = kimivl_local.load(path, device="cuda", dtype=torch.float32, cpu_experts=n)
        assert len(api.memory_plan.placement.cpu_expert_layers) == n
        ids = torch.tensor(api.tokenizer.encode("Hello there, how are you?"), device="cuda")
        with torch.inference_mode():
            lm = api.model.language_model
            outputs.append(lm.logits(lm.hidden_states(api.model.embed(ids))).cpu())
    # The host experts run the CPU kernels (int8 activations), the GPU ones the CUDA kernels.
    assert float((outputs[0] - outputs[1]).norm() / outputs[0].norm()) < 2e-2
