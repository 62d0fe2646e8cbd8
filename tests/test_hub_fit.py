"""Make it fit, once: a checkpoint that does not fit the memory budget (KIMIVL_HOST_MEMORY_GB on
the CPU) while a quantize recipe's result does is quantized into kimivl-local's cache after a yes
(or --fit), and every later run starts from that entry."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")  # drives the CLI at a terminal

from hub_support import FakeHub, repo_from_folder
from kimivl_local.cli import fit
from kimivl_local.cli.info import format_bytes
from conftest import CLI_CWD

COMMIT = "c" * 40
GiB = 1 << 30


@pytest.fixture(scope="module")
def budget(tiny_checkpoint):
    """A host budget the bf16 tiny model exceeds and its chosen recipe meets, and that recipe."""
    options = {"device": "cpu"}
    bf16 = fit.plan_as_is(tiny_checkpoint, options, None).device_total
    fits = [f for f in fit.recipe_fits(tiny_checkpoint, options, None) if f.plan]
    assert fits, "no recipe applies to the tiny checkpoint"
    largest = max(f.plan.device_total for f in fits)
    assert largest < bf16
    gb = (largest + bf16) / 2 / GiB
    return f"{gb:.12f}", fit.choose(fits).recipe


@pytest.fixture
def env(tmp_path, budget):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "KIMIVL_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               KIMIVL_CACHE=str(tmp_path / "kimivl-cache"), KIMIVL_HOST_MEMORY_GB=budget[0])
    return env


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "kimivl_local.cli.main", *args], env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=180,
                          cwd=CLI_CWD)


GEN = ["-p", "hi", "--max-new-tokens", "2", "--device", "cpu"]


def test_no_terminal_no_flag_no_quantize_and_nothing_left(env, tiny_checkpoint, budget):
    result = _cli(env, "generate", str(tiny_checkpoint), *GEN)
    assert result.returncode == 2
    assert "does not fit" in result.stderr and f"recipe {budget[1]!r} it fits" in result.stderr
    assert "Pass --fit" in result.stderr and "Traceback" not in result.stderr
    assert not Path(env["KIMIVL_CACHE"]).exists()


@pytest.mark.slow
def test_no_at_the_prompt_quantizes_nothing(env, tiny_checkpoint):
    child = pexpect.spawn(sys.executable, ["-m", "kimivl_local.cli.main", "generate",
                                           str(tiny_checkpoint), *GEN],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200), cwd=CLI_CWD)
    child.expect(r"Quantize it now\? \[y/N\] ")
    child.sendline("n")
    child.expect("but this machine has")  # the planner's own refusal, as without the offer
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert not Path(env["KIMIVL_CACHE"]).exists()


@pytest.mark.slow
def test_nothing_offered_when_no_recipe_fits(env, tiny_checkpoint):
    result = _cli(dict(env, KIMIVL_HOST_MEMORY_GB="0.01"), "generate", str(tiny_checkpoint), *GEN)
    assert result.returncode == 2 and "does not fit" not in result.stderr
    assert "but this machine has 0.01 GB" in result.stderr
    assert not Path(env["KIMIVL_CACHE"]).exists()


@pytest.mark.slow
def test_one_command_downloads_quantizes_once_then_starts_cached(env, tiny_checkpoint, budget):
    recipe = budget[1]
    hub = FakeHub()
    hub.repos["org/tiny"] = repo_from_folder(tiny_checkpoint, COMMIT)
    with hub:
        env = dict(env, HF_ENDPOINT=hub.url)
        first = _cli(env, "generate", "org/tiny", "--download", "--fit", *GEN)
        assert first.returncode == 0, first.stderr
        assert "does not fit" in first.stderr and "quantize:" in first.stderr
        name = f"org--tiny--{COMMIT[:12]}--{recipe}"
        entry = Path(env["KIMIVL_CACHE"]) / name
        assert f"loaded {entry}" in first.stderr and "2 generated" in first.stderr
        assert sorted(p.name for p in Path(env["KIMIVL_CACHE"]).iterdir()) == [".staging", name]
        assert list((Path(env["KIMIVL_CACHE"]) / ".staging").iterdir()) == []
        stamps = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

        hub.requests.clear()
        again = _cli(env, "generate", "org/tiny", *GEN)  # no flags: nothing left to ask
        assert again.returncode == 0, again.stderr
        assert f"using the {recipe}-quantized copy" in again.stderr
        assert "quantize:" not in again.stderr and f"loaded {entry}" in again.stderr
        assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == stamps
        assert hub.requests == []

    listed = _cli(env, "list")
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.strip().startswith(name))
    size = format_bytes(sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()))
    assert "org/tiny" in row and COMMIT[:12] in row and recipe in row and row.endswith(size)
    assert "not an entry" in _cli(env, "rm", "../hf").stderr  # only our own entries
    assert Path(env["HF_HOME"]).is_dir()
    removed = _cli(env, "rm", name)
    assert removed.returncode == 0 and not entry.exists()
    assert _cli(env, "rm", name).returncode == 2


def test_host_memory_budget_knob(tiny_checkpoint, monkeypatch):
    from kimivl_local.engine.memory_plan import MemoryPlanError

    monkeypatch.setenv("KIMIVL_HOST_MEMORY_GB", "0.01")
    with pytest.raises(MemoryPlanError, match="this machine has 0.01 GB"):
        fit.plan_as_is(tiny_checkpoint, {"device": "cpu"}, None)
    monkeypatch.setenv("KIMIVL_HOST_MEMORY_GB", "lots")
    with pytest.raises(MemoryPlanError, match="KIMIVL_HOST_MEMORY_GB must be a number"):
        fit.plan_as_is(tiny_checkpoint, {"device": "cpu"}, None)


def test_cache_entries_are_keyed_by_source_and_listed_with_interrupted_builds(
        tmp_path, monkeypatch, tiny_checkpoint):
    from kimivl_local.checkpoint.hub import Located
    from kimivl_local.cli import model_cache
    from kimivl_local.errors import InputError

    monkeypatch.setenv("KIMIVL_CACHE", str(tmp_path / "cache"))
    hub_source = Located(tiny_checkpoint, "org/tiny", COMMIT)
    assert model_cache.entry_name(hub_source, "int8") == f"org--tiny--{COMMIT[:12]}--int8"
    local = model_cache.entry_name(Located(tiny_checkpoint), "int8")
    assert local.startswith("local--tiny-") and local.endswith("--int8")
    assert model_cache.find(hub_source, "int8") is None and model_cache.entries() == []
    # A build interrupted mid-way: listed as such (it resumes), removable, and not used.
    partial = tmp_path / "cache" / ".staging" / f"org--tiny--{COMMIT[:12]}--int8.partial"
    partial.mkdir(parents=True)
    (partial / "model-00001-of-00001.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "cache" / "not-ours").mkdir()  # no marker: never listed, never removed
    [entry] = model_cache.entries()
    assert (entry.complete, entry.recipe, entry.bytes) == (False, "int8", 10)
    assert model_cache.find(hub_source, "int8") is None
    with pytest.raises(InputError, match="not an entry"):
        model_cache.remove("not-ours")
    model_cache.remove(entry.name)
    assert not partial.exists() and (tmp_path / "cache" / "not-ours").is_dir()
