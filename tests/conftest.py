from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Where CLI subprocesses start: `python -m`/`-c` put the working directory first on sys.path, and
# in the repo root the source tree would shadow the installed package (whose kimivl_local.quantize
# and kimivl_local.app come from setup.py's package_dir).
CLI_CWD = REPO / "tests"


def pytest_report_header(config):
    import kimivl_local
    from kimivl_local.kernels.extension import build_info

    info = build_info()
    where = Path(kimivl_local.__file__).parent
    ext = "extension: " + (f"yes (cuda={info['cuda']}, isa={info.get('cpu_isa_selected')})"
                           if info["available"] else f"no ({info['error']})")
    return [f"kimivl_local from {where}", ext]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def exact_vision_tower(monkeypatch):
    """Tests compare MoonViT with fp32/fp64 oracles at fp32 tolerances: keep its exact fp32 path
    (the bf16 linears of a CPU with AVX512-BF16 are tested on their own, test_vision.py)."""
    monkeypatch.setenv("KIMIVL_VISION_EXACT", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The default tiny synthetic checkpoint, written once per session (treat as read-only)."""
    from kimivl_local.synthetic.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_fp32(tiny_checkpoint):
    import kimivl_local

    return kimivl_local.load(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture
def fresh_checkpoint(tmp_path):
    """A private tiny checkpoint a test may corrupt."""
    from kimivl_local.synthetic.checkpoint import write_checkpoint

    def make(**kwargs):
        return write_checkpoint(tmp_path / "ckpt", preset="tiny", **kwargs)

    return make


# Every linear input size a multiple of 128, so the quantize recipes' group sizes apply.
TINY128 = dict(hidden_size=128, kv_lora_rank=128, v_head_dim=32, moe_intermediate_size=128,
               intermediate_size=256)


@pytest.fixture(scope="session")
def tiny128_checkpoint(tmp_path_factory) -> Path:
    """A tiny synthetic checkpoint whose linears all take 128 or 256 inputs (treat as read-only)."""
    from kimivl_local.synthetic.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt128") / "tiny128", preset="tiny", seed=1,
                            text_overrides=TINY128)


@pytest.fixture(scope="session")
def quantized(tiny128_checkpoint, tmp_path_factory):
    """quantized(recipe, *rules) -> tiny128_checkpoint quantized so (written once per session;
    treat as read-only)."""
    from quantize_support import import_quantize

    quantize = import_quantize("main").quantize
    made = {}

    def get(recipe: str, *rules: str) -> Path:
        if (recipe, rules) not in made:
            dst = tmp_path_factory.mktemp("quantized") / recipe
            quantize(tiny128_checkpoint, dst, recipe=recipe, rules=list(rules))
            made[recipe, rules] = dst
        return made[recipe, rules]

    return get
