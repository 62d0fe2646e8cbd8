"""The CLI as a user drives it: the installed `kimivl-local` script, in a pseudo-terminal for chat."""

import shutil
import subprocess
import sys

import pytest

from kimivl_local.cli.main import main
from conftest import CLI_CWD

EXE = shutil.which("kimivl-local")


def _run(*args, input_text=None):
    cmd = [EXE] if EXE else [sys.executable, "-m", "kimivl_local.cli.main"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, input=input_text,
                          timeout=300, cwd=CLI_CWD)


def test_chat_streams_in_a_terminal(tiny_checkpoint, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (150, 100), (10, 120, 200)).save(image)  # 24 image tokens
    pexpect = pytest.importorskip("pexpect")
    cmd = EXE or sys.executable
    args = ["chat", str(tiny_checkpoint), "--max-new-tokens", "12"]
    child = pexpect.spawn(cmd, args if EXE else ["-m", "kimivl_local.cli.main", *args],
                          encoding="utf-8", timeout=120, dimensions=(40, 120), cwd=CLI_CWD)
    try:
        child.expect(">>> ")
        child.sendline("Hello, who are you?")
        # The answer streams, then the per-answer speed line, then the next prompt.
        child.expect(r"\[(\d+) tokens, [\d.]+ tok/s; prompt (\d+) tokens")
        assert int(child.match.group(1)) >= 1
        first_prompt_tokens = int(child.match.group(2))
        child.expect(">>> ")
        child.sendline("/help")
        child.expect("/image PATH")
        child.sendline("/image /no/such/file.png")
        child.expect("image not found")
        child.sendline(f"/image {image}")
        child.expect("attached")
        child.sendline("And this picture?")  # second turn: history + image lengthen the prompt
        child.expect(r"prompt (\d+) tokens")
        assert int(child.match.group(1)) > first_prompt_tokens + 20
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_generate_prints_text_and_stats(tiny_checkpoint):
    result = _run("generate", str(tiny_checkpoint), "-p", "Hi", "--max-new-tokens", "8",
                  "--temperature", "0.7", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "8 generated" in result.stderr
    again = _run("generate", str(tiny_checkpoint), "-p", "Hi", "--max-new-tokens", "8",
                 "--temperature", "0.7", "--seed", "1")
    assert again.stdout == result.stdout  # seeded sampling is reproducible


def test_missing_weights_give_one_clear_line(tmp_path):
    result = _run("chat", "--model", "moonshotai/Kimi-VL-A3B-Instruct")
    assert result.returncode == 2
    assert "not in the local Hugging Face cache" in result.stderr
    assert "Traceback" not in result.stderr
    result = _run("generate", str(tmp_path / "missing"), "-p", "x")
    assert result.returncode == 2 and "no such folder" in result.stderr


def test_prompt_too_long_for_context(tiny_checkpoint):
    result = _run("generate", str(tiny_checkpoint), "--max-context", "16", "-p", "word " * 50)
    assert result.returncode == 2
    assert "context holds 16" in result.stderr and "Traceback" not in result.stderr


def test_info_reports_build_and_model(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "extension:" in out and "3 layers, hidden 64, 8 experts top-3" in out


def test_synthetic_command(tmp_path, capsys):
    assert main(["synthetic", str(tmp_path / "ck"), "--layers", "2", "--experts", "4"]) == 0
    import json

    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())["text_config"]
    assert (cfg["num_hidden_layers"], cfg["n_routed_experts"]) == (2, 4)
    assert main(["synthetic", str(tmp_path / "ck")]) == 2  # refuses to overwrite
    assert "already holds a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--temperature", "-1"], ["--top-p", "1.5"], ["--max-new-tokens", "0"]])
def test_bad_sampling_options(tiny_checkpoint, bad):
    result = _run("generate", str(tiny_checkpoint), "-p", "x", *bad)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr


def test_generate_with_images(tiny_checkpoint, tmp_path):
    from PIL import Image

    good = tmp_path / "photo.png"
    Image.new("RGB", (90, 50), (200, 30, 30)).save(good)
    result = _run("generate", str(tiny_checkpoint), "--image", str(good), "-p", "What color?",
                  "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = _run("generate", str(tiny_checkpoint), "--image", str(bad), "-p", "x")
    assert result.returncode == 2 and "notes.png" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model is loaded: every input check must come first."""
    import kimivl_local

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(kimivl_local, "load", load)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    from media_files import write_pdf, write_video

    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 48), (10, 120, 200)).save(folder / "good.png")
    (folder / "cut.png").write_bytes((folder / "good.png").read_bytes()[:60])
    (folder / "notes.txt").write_text("not an image")
    write_pdf(folder / "doc.pdf", [(100, 80, "Hello")])
    (folder / "bad.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)))
    write_video(folder / "clip.mkv", frames=4, rate=2)
    return folder


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("args,says", [
    (["--image", "cut.png"], "cut.png: cannot decode the image, it is truncated"),
    (["--image", "notes.txt"], "notes.txt: not an image"),
    (["--image", "missing.png"], "missing.png: no such file"),
    (["--pdf", "doc.pdf", "--pages", "2-1"], "'2-1' selects no page"),
    (["--pdf", "doc.pdf", "--pages", "2"], "the document has 1 page"),
    (["--pages", "1"], "--pages 1 selects pages of a --pdf, and none was given"),
    (["--pdf", "bad.pdf"], "bad.pdf: not a PDF, or a corrupt one"),
    (["--video", "doc.pdf"], "doc.pdf: not a video PyAV can read"),
    (["--video", "clip.mkv", "--fps", "1e308"], "fps must be a number above 0 and at most 1000"),
    (["--fps", "nan"], "fps must be a number"),
    (["--max-frames", "0"], "max_frames must be a positive integer"),
    (["--max-frames", "100000"], "max_frames must be at most 512"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_inputs_are_checked_before_the_model_loads(tiny_checkpoint, files, no_load, capsys,
                                                   monkeypatch, command, args, says):
    monkeypatch.chdir(files)
    assert main([command, str(tiny_checkpoint), "-p", "x", *args] if command == "generate"
                else [command, str(tiny_checkpoint), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err, err


def test_chat_refuses_a_bad_attachment_and_drops_pending_ones(tiny_model_fp32, files, capsys):
    from kimivl_local.cli.chat_repl import ChatRepl

    options = {"text_layer": False, "fps": 1.0, "max_frames": 2}
    repl = ChatRepl(tiny_model_fp32, None, {"max_new_tokens": 2}, [], options)
    repl.command("/help")
    assert "/drop" in capsys.readouterr().out
    for line, says in [(f"/image {files / 'cut.png'}", "cut.png: cannot decode the image"),
                       (f"/image {files / 'notes.txt'}", "notes.txt: not an image"),
                       (f"/pdf {files / 'bad.pdf'}", "bad.pdf: not a PDF"),
                       (f"/video {files / 'doc.pdf'}", "doc.pdf: not a video")]:
        repl.command(line)
        out = capsys.readouterr().out
        assert says in out and "(not attached)" in out and not repl.pending
    repl.answer("hello")  # the refused files do not ride along
    assert capsys.readouterr().out.count("error") == 0 and len(repl.history) == 2
    repl.command(f"/image {files / 'good.png'}")
    repl.command(f"/pdf {files / 'doc.pdf'}")
    assert len(repl.pending) == 3  # the image; the page's label and image
    repl.sampling = {"max_new_tokens": 0}  # a turn that fails keeps them, and says how to drop
    repl.answer("and now?")
    assert "/drop forgets them" in capsys.readouterr().out and len(repl.pending) == 3
    repl.command("/drop")
    assert capsys.readouterr().out.strip() == "(dropped good.png, doc.pdf)"
    assert not repl.pending and len(repl.history) == 2  # the conversation stays
    repl.command("/drop")
    assert "nothing attached" in capsys.readouterr().out
