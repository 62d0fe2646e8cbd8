"""`kimivl-local selftest`: every compiled op against its fp64 torch reference, on each CPU ISA
this machine can force and (gpu marker) on CUDA; a wrong kernel or a silent torch fallback fails
its row, and the exit code says so."""

import json

import pytest
import torch

from kimivl_local.cli import main as cli, selftest
from kimivl_local.kernels.bridge import set_backend
from kimivl_local.kernels.extension import extension

from kernel_support import ISAS, force_isa


@pytest.fixture
def restore_backend():
    yield
    set_backend("auto")


# The fastest ISA runs by default; the others (portable: ~8 s) under the slow marker.
@pytest.mark.parametrize("isa", [pytest.param(i, marks=[] if i == ISAS[-1] else pytest.mark.slow)
                                 for i in ISAS])
def test_every_cpu_kernel_passes_on_each_isa(monkeypatch, isa):
    force_isa(monkeypatch, isa, "quant_matmul")
    checks = selftest.run_selftest(torch.device("cpu"))
    ops = {c.op for c in checks}
    assert ops == {"quant_matmul", "moe_block", "varlen_attention", "mla_decode", "head_gemv"}
    bad = [c for c in checks if not c.passed]
    assert not bad, selftest.format_table(bad)
    assert all(0 <= c.max_error <= c.bound and c.seconds > 0 for c in checks)


def test_a_wrong_kernel_fails_its_row(monkeypatch):
    ext = extension()
    if ext is None or not hasattr(ext, "varlen_attention"):
        pytest.skip("no compiled varlen_attention in this install")
    real = ext.varlen_attention
    # The right kernel with the wrong softmax scale: plausible-looking, wrong numbers.
    monkeypatch.setattr(ext, "varlen_attention",
                        lambda **kw: real(**{**kw, "scale": kw["scale"] * 1.5}))
    case = next(c for c in selftest.cases(torch.device("cpu")) if c.op == "varlen_attention")
    check = selftest.run_case(case, torch.device("cpu"))
    assert not check.passed and check.max_error > case.bound


def test_a_torch_fallback_is_not_a_pass(restore_backend):
    if extension() is None:
        pytest.skip("no compiled extension in this install")
    set_backend("reference")  # every op runs its torch reference: right numbers, no kernel
    case = selftest.cases(torch.device("cpu"))[0]
    check = selftest.run_case(case, torch.device("cpu"))
    assert not check.passed and "did not run" in check.note
    assert check.max_error <= case.bound


def test_a_missing_kernel_is_reported(monkeypatch):
    ext = extension()
    if ext is None:
        pytest.skip("no compiled extension in this install")
    monkeypatch.delattr(ext, "head_gemv")
    case = next(c for c in selftest.cases(torch.device("cpu")) if c.op == "head_gemv")
    check = selftest.run_case(case, torch.device("cpu"))
    assert not check.passed and "not in this build" in check.note


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    if extension() is None:
        pytest.skip("no compiled extension in this install")
    out = tmp_path / "selftest.json"
    assert cli.main(["selftest", "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max error" in text and "8 of 8 passed" in text
    rows = json.loads(out.read_text())["checks"]
    assert len(rows) == 8 and all(r["passed"] for r in rows)


def test_cli_exit_code_is_nonzero_on_failure(monkeypatch, capsys):
    if extension() is None:
        pytest.skip("no compiled extension in this install")
    monkeypatch.delattr(extension(), "head_gemv")
    assert cli.main(["selftest", "--device", "cpu"]) == 1
    assert "7 of 8 passed" in capsys.readouterr().out


@pytest.mark.parametrize("device, message", [("tpu", "--device must be"),
                                             ("cuda", "no CUDA GPU is visible")])
def test_cli_refuses_bad_devices(device, message, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    assert cli.main(["selftest", "--device", device]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.gpu
def test_every_cuda_kernel_passes():
    checks = selftest.run_selftest(torch.device("cuda"))
    bad = [c for c in checks if not c.passed]
    assert not bad, selftest.format_table(bad)
    assert {c.op for c in checks} == {"quant_matmul", "moe_block", "varlen_attention",
                                      "mla_decode"}


def test_a_kernel_error_in_a_command_points_to_selftest(monkeypatch, capsys):
    def crash(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(cli, "cmd_generate", crash)  # _parser() looks it up when called
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cli.main(["generate", "x", "-p", "hi"])
    assert "kimivl-local selftest" in capsys.readouterr().err
