"""`kimivl-local info`: what a checkpoint stores (formats per part, sizes in fitting units), the
build's CUDA note, and output into a pipe that closes early."""

import subprocess
import sys

import pytest

from kimivl_local.cli.info import collect_info, format_bytes, format_info
from kimivl_local.cli.main import EXIT_BROKEN_PIPE, main
from quantize_support import import_quantize


@pytest.fixture(scope="module")
def quantized_checkpoint(tiny_checkpoint, tmp_path_factory):
    dst = tmp_path_factory.mktemp("q") / "tiny-q"
    rules = [r"--rule=mlp\.experts\.=4:32", r"--rule=self_attn\..*proj=8:channel"]
    assert import_quantize("main").main([str(tiny_checkpoint), str(dst), *rules]) == 0
    return dst


def test_sizes_use_a_unit_that_fits():
    assert format_bytes(16_410_000_000) == "16.41 GB"
    assert format_bytes(687_792) == "687.8 KB"
    assert format_bytes(3_500_000) == "3.5 MB"
    assert format_bytes(512) == "512 bytes"


def test_info_names_the_formats_of_a_quantized_checkpoint(tiny_checkpoint, quantized_checkpoint):
    plain = collect_info(str(tiny_checkpoint))["model"]
    quant = collect_info(str(quantized_checkpoint))["model"]
    # Packed int32 words count as the weights they hold, not as parameters of their own.
    assert quant["parameters"] == plain["parameters"]
    assert quant["quantization"] == "compressed-tensors pack-quantized"
    formats = {(p["part"], p["format"]) for p in quant["parts"]}
    assert ("routed experts", "INT4 g32") in formats
    assert ("attention", "INT8 per-channel") in formats
    assert ("vision tower", "BF16") in formats
    assert not any(part == "attention" and fmt == "BF16" for part, fmt in formats)
    assert sum(p["bytes"] for p in quant["parts"]) == quant["bytes"] < plain["bytes"]

    text = format_info(collect_info(str(quantized_checkpoint)))
    assert "0.00 GB" not in text and "GiB" not in text
    assert "(compressed-tensors pack-quantized)" in text
    routed = next(line for line in text.splitlines() if "routed experts" in line)
    assert "INT4 g32" in routed and routed.endswith(" KB")


def test_info_says_why_cuda_is_or_is_not_compiled(capsys):
    info = collect_info()
    ext = info["extension"]
    if not ext["available"]:
        pytest.skip("no extension in this install")
    assert ext["cuda_mode"] in ("auto", "on", "off", "cmake") and ext["cuda_note"]
    assert main(["info"]) == 0
    cuda_line = next(line for line in capsys.readouterr().out.splitlines()
                     if line.strip().startswith("cuda:"))
    assert ext["cuda_note"] in cuda_line


def test_output_into_a_closed_pipe_ends_quietly(tiny_checkpoint):
    cli = "import sys; from kimivl_local.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", cli, "info", str(tiny_checkpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert err == ""
