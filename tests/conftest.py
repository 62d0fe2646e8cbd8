from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def pytest_report_header(config):
    import kimivl_local
    from kimivl_local.ext import build_info

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The default tiny synthetic checkpoint, written once per session (treat as read-only)."""
    from kimivl_local.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_fp32(tiny_checkpoint):
    import kimivl_local

    return kimivl_local.load(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture
def fresh_checkpoint(tmp_path):
    """A private tiny checkpoint a test may corrupt."""
    from kimivl_local.synthetic import write_checkpoint

    def make(**kwargs):
        return write_checkpoint(tmp_path / "ckpt", preset="tiny", **kwargs)

    return make

