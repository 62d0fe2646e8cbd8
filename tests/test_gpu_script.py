"""bench/gpu_session.sh, the one-call device session, runs here as a dry run: the same steps,
the GPU ones checked (their files exist, their kimivl-local command lines parse) and reported
as skipped, so the first session with a GPU does not debug the script."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _load_bench_module(name):
    # By file path: putting bench/ on sys.path would shadow installed packages (bench/kernels.py
    # hides the `kernels` package that transformers imports).
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_session = _load_bench_module("gpu_session")

NAMES = [s.name for s in gpu_session.STEPS]


def run_session(tmp_path, *args):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench/gpu_session.sh"), "--work",
                           str(tmp_path / "work"), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    return proc, summary, out


def test_dry_run_checks_every_step_and_writes_the_summary(tmp_path):
    steps = [n for n in NAMES if n != "collect"]  # collect runs in the slow test below
    proc, summary, out = run_session(tmp_path, "--dry-run", "--only", ",".join(steps))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["dry_run"] and summary["ok"]
    assert [s["name"] for s in summary["steps"]] == steps
    by_name = {s["name"]: s for s in summary["steps"]}
    env = by_name["env"]
    assert env["status"] == "pass"
    assert env["figures"]["torch"] and env["figures"]["modules"]["torch"]
    for step in gpu_session.STEPS:
        if step.needs_gpu:
            s = by_name[step.name]
            assert s["status"] == "skip" and s["reason"].startswith("dry run"), s
            assert (s["command"] is None) == (step.name in ("build", "build_info",
                                                            "device_build"))
    assert by_name["bench_cpu_experts"]["command"][-2:] == ["--cpu-experts", "1"]
    # what comes back from the device: at most 8 files, one folder deep
    assert sorted(p.name for p in out.iterdir()) == ["driver.log", "steps.log", "summary.json"]
    assert "step" in proc.stdout.splitlines()[-len(steps) - 2]  # the table ends the output


def test_a_missing_build_blocks_every_gpu_step_and_fails(tmp_path):
    """No usable extension: the build fails loudly and the steps after it are blocked, never
    green with everything skipped."""
    proc, summary, _ = run_session(tmp_path, "--build", "prebuilt", "--prebuilt",
                                   str(tmp_path / "none"), "--only",
                                   "build,build_info,selftest,gpu_tests")
    assert proc.returncode == 1
    status = {s["name"]: (s["status"], s["reason"]) for s in summary["steps"]}
    assert status["build"][0] == "fail" and "gpu_prep.sh" in status["build"][1]
    assert status["build_info"] == ("blocked", "needs build")
    assert status["selftest"] == ("blocked", "needs build_info")
    assert not summary["ok"]


def test_bad_commands_are_caught_by_the_dry_run(monkeypatch):
    session = gpu_session.Session(type("A", (), {"out": "x", "work": "/tmp/w", "budget": 1,
                                                 "layers": 2, "dry_run": True})())
    step = next(s for s in gpu_session.STEPS if s.name == "bench_graphs")
    assert session.check_command(step)[:4] == [sys.executable, "-m", "kimivl_local.cli.main",
                                               "bench"]
    real = session.command
    monkeypatch.setattr(session, "command",
                        lambda s: ((real(s)[0] + ["--no-such-flag"]), {}))
    with pytest.raises(SystemExit):
        session.check_command(step)


def test_junit_summary(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
                   '<testcase classname="t" name="a" time="0.5"/>'
                   '<testcase classname="t" name="b" time="1.5"><failure message="boom"/>'
                   '</testcase></testsuite></testsuites>')
    j = gpu_session._junit(xml)
    assert (j["passed"], j["failures"], j["skipped"]) == (1, 1, 2)
    assert j["failed_tests"] == [{"test": "t::b", "kind": "failure", "message": "boom"}]


@pytest.mark.slow
def test_full_dry_run_collects_the_gpu_tests(tmp_path):
    proc, summary, _ = run_session(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collect = next(s for s in summary["steps"] if s["name"] == "collect")
    assert collect["status"] == "pass" and collect["figures"]["collected"] > 20


def test_a_prebuilt_that_does_not_load_falls_back_to_compiling(tmp_path, monkeypatch):
    """--build auto: the carried extension installs but fails to import (say, an older
    libstdc++ there), so the step compiles for the GPU present instead and says why."""
    repo = tmp_path / "repo"
    (repo / "kimivl_local").mkdir(parents=True)
    (repo / "kimivl_local" / "_C.stale.so").write_text("")
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    suffix = gpu_session.sysconfig.get_config_var("EXT_SUFFIX")
    (prebuilt / f"_C{suffix}").write_text("not an ELF file")
    monkeypatch.setattr(gpu_session, "REPO", repo)
    calls = []

    def sh(step, cmd, timeout, env=None, cwd=None):
        calls.append((cmd, env or {}))
        if cmd[1] == "-c":  # the import check of the prebuilt
            return 1, "ImportError: /lib/libstdc++.so.6: version `GLIBCXX_3.4.30' not found"
        return 0, "Successfully installed kimivl-local"

    args = type("A", (), {"out": str(tmp_path), "work": str(tmp_path), "budget": 100,
                          "build": "auto", "prebuilt": str(prebuilt), "dry_run": False})()
    session = gpu_session.Session(args)
    session.capability = "8.9"
    monkeypatch.setattr(session, "sh", sh)
    step = next(s for s in gpu_session.STEPS if s.name == "build")
    result = session.step_build(step, 100)
    assert result.status == "pass" and result.figures["mode"] == "device"
    assert "GLIBCXX_3.4.30" in result.figures["prebuilt_error"]
    assert [env.get("KIMIVL_SKIP_EXT") for _, env in calls] == ["1", None, None]
    assert calls[-1][1]["KIMIVL_CUDA"] == "on" and calls[-1][1]["KIMIVL_CUDA_ARCHS"] == "89"
    assert session.build_mode == "device"
    assert not (repo / "kimivl_local" / f"_C{suffix}").exists()  # the failed copy is gone
    assert not (repo / "kimivl_local" / "_C.stale.so").exists()
