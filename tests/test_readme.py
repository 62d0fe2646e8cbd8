"""The README's Python example runs as written (on the tiny checkpoint, with a PDF and a clip
made here)."""

import os
import re
from pathlib import Path

import pytest

from media_files import write_pdf, write_video

README = Path(__file__).resolve().parent.parent / "README.md"


def python_example() -> str:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return next(b for b in blocks if "kimivl_local.load" in b)


@pytest.mark.slow
def test_readme_python_example_runs(tiny_checkpoint, tmp_path, capsys):
    write_pdf(tmp_path / "report.pdf", [(200, 100, "quarterly numbers")] * 3)
    write_video(tmp_path / "clip.mp4", frames=4, rate=2)
    code = python_example().replace("path/to/Kimi-VL-A3B-Instruct", str(tiny_checkpoint))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    finally:
        os.chdir(cwd)
    assert isinstance(namespace["answer"], str)
    assert tuple(namespace["logits"].shape) == (len(namespace["ids"]), 1280)
    assert capsys.readouterr().out.rstrip().endswith(namespace["model"].memory_plan.summary())


def test_readme_links_point_to_files_in_the_repository():
    links = re.findall(r"\]\(([^)#:]+)\)", README.read_text(encoding="utf-8"))
    assert "docs/architecture.md" in links
    missing = [link for link in links if not (README.parent / link).exists()]
    assert not missing
