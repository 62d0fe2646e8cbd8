"""One device session, end to end: build, check and measure the whole GPU path in one call.

    bash bench/gpu_session.sh [--dry-run] [--budget SECONDS] [--layers N] [--build MODE]

(the .sh sets up carried wheels and calls this). Steps run in order of what they prove, each
under its own timeout, all inside --budget seconds; a step that would not fit is skipped and
says so. Everything lands in $OUT (default bench/out/gpu-session): summary.json (per step:
status pass/fail/skip, seconds, command, reason, and every figure the step measured) and
steps.log (each step's output). The last lines printed are a table of the steps.

--dry-run (any machine, run in CI by tests/test_gpu_script.py): the steps that need no GPU run
for real, the others are checked (their scripts and test files exist, the `kimivl-local`
command lines parse) and reported as skipped.

Build modes: prebuilt (the extension built here by bench/gpu_prep.sh, carried in .prebuilt/),
device (KIMIVL_CUDA=on for the GPU present), auto (prebuilt when .prebuilt/ holds one for this
Python, else device). Without a working CUDA build every later GPU step is reported blocked and
the exit code is 1: a run that tested nothing never looks green.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREBUILT = REPO / ".prebuilt"
LOG_LIMIT = 400_000  # characters of one step's output kept in steps.log (head and tail)


@dataclass
class Step:
    name: str
    what: str
    timeout: int  # seconds, when the budget allows
    needs_gpu: bool = True
    needs: tuple[str, ...] = ()  # steps that must have passed
    estimate: int = 0  # expected seconds on an H100 (a plan, not a measurement)


@dataclass
class Result:
    name: str
    status: str  # pass, fail, skip, timeout, blocked
    seconds: float = 0.0
    command: list[str] | None = None
    reason: str = ""
    figures: dict = field(default_factory=dict)


STEPS = [  # in order of what they prove: correctness first, then the targets, then the extras
    Step("env", "GPU, driver, torch, nvcc, Python, packages", 60, needs_gpu=False, estimate=5),
    Step("build", "install the package with a CUDA extension for the GPU present", 420,
         estimate=20),
    Step("build_info", "_C.build_info() says CUDA, for this GPU's architecture", 60,
         needs=("build",), estimate=5),
    Step("collect", "pytest collects every gpu test with the packages present", 120,
         needs_gpu=False, estimate=15),
    Step("selftest", "kimivl-local selftest --device cuda", 180, needs=("build_info",),
         estimate=40),
    Step("gpu_tests", "pytest -m gpu (kernels, ops, runtime)", 420, needs=("build_info",),
         estimate=120),
    Step("cuda_host_tests", "CUDA entry points' host-side checks (tests/test_cuda_*.py)", 120,
         needs=("build_info",), estimate=20),
    Step("model_tests", "model-level GPU tests (tests/test_gpu_model.py)", 300,
         needs=("build_info",), estimate=60),
    Step("synthetic", "full-width synthetic checkpoint (--layers N)", 300, needs=("build",),
         estimate=60),
    Step("quantize", "kimivl-local quantize --recipe default", 300, needs=("synthetic",),
         estimate=60),
    Step("bench_graphs", "kimivl-local bench, CUDA graphs on", 240,
         needs=("quantize", "build_info"), estimate=40),
    Step("kernels_bench", "bench/kernels.py --device cuda --quick (decode shapes)", 180,
         needs=("build_info",), estimate=30),
    Step("attention_bench", "bench/attention_cases.py --device cuda", 120,
         needs=("build_info",), estimate=30),
    Step("bench_eager", "kimivl-local bench, KIMIVL_CUDA_GRAPHS=0", 240,
         needs=("quantize", "build_info"), estimate=40),
    Step("bench_cpu_experts", "kimivl-local bench --cpu-experts 1", 240,
         needs=("quantize", "build_info"), estimate=40),
    Step("memory_32k", "peak GPU memory against the plan at 32K context", 240,
         needs=("quantize", "build_info"), estimate=40),
    Step("memcheck", "compute-sanitizer memcheck over the selftest", 240,
         needs=("build_info",), estimate=90),
    Step("device_build", "compile KIMIVL_CUDA=on on the device (when the prebuilt ran)", 420,
         estimate=120),
]


class Session:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.deadline = time.monotonic() + args.budget
        self.results: dict[str, Result] = {}
        self.python = sys.executable
        self.log = None
        self.output: dict[str, str] = {}  # the latest command's output, per step

    # ---- running -------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def sh(self, step: Step, cmd: list[str], timeout: float, env: dict | None = None,
           cwd: Path = REPO) -> tuple[int | None, str]:
        """Run cmd (output to steps.log); rc None on timeout (the process group is killed)."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            text, _ = proc.communicate()
            rc = None
        self.write_log(step.name, cmd, env, text, rc, time.monotonic() - start)
        self.output[step.name] = text
        return rc, text

    def write_log(self, name, cmd, env, text, rc, seconds) -> None:
        if len(text) > LOG_LIMIT:
            text = (text[:LOG_LIMIT // 4] + f"\n[... {len(text) - LOG_LIMIT} characters cut ...]\n"
                    + text[-3 * LOG_LIMIT // 4:])
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        self.log.write(f"\n===== {name}: {shown + ' ' if shown else ''}{' '.join(cmd)}\n{text}"
                       f"===== {name}: rc {rc} after {seconds:.1f}s\n")
        self.log.flush()

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        only = set(self.args.only.split(",")) if self.args.only else None
        with open(self.out / "steps.log", "w", encoding="utf-8") as self.log:
            for step in STEPS:
                if only is not None and step.name not in only:
                    continue
                self.results[step.name] = self.run_step(step)
                self.write_summary()
        print(self.table())
        return 0 if self.ok() else 1

    def run_step(self, step: Step) -> Result:
        missing = [n for n in step.needs if n in self.results
                   and self.results[n].status != "pass"]
        start = time.monotonic()
        if self.args.dry_run and step.needs_gpu:
            try:
                cmd = self.check_command(step)
            except (ValueError, SystemExit) as exc:  # argparse exits on a bad command line
                return Result(step.name, "fail", reason=f"dry run: bad command: {exc}")
            return Result(step.name, "skip", 0.0, cmd, "dry run: command checked, not run")
        if missing:
            return Result(step.name, "blocked", 0.0, None, f"needs {', '.join(missing)}")
        timeout = min(step.timeout, self.remaining() - 5)
        if timeout < min(step.timeout, max(step.estimate, 10)):
            return Result(step.name, "skip", 0.0, None,
                          f"out of time ({self.remaining():.0f}s left of the budget)")
        try:
            result = getattr(self, "step_" + step.name)(step, timeout)
        except Exception as exc:  # noqa: BLE001 - a broken step must not end the session
            result = Result(step.name, "fail", reason=f"{type(exc).__name__}: {exc}")
        result.seconds = round(time.monotonic() - start, 1)
        print(f"[{result.seconds:6.1f}s] {step.name}: {result.status} {result.reason}",
              flush=True)
        return result

    def command(self, step: Step) -> tuple[list[str], dict]:
        """The command line (and extra environment) of a step that runs one command."""
        py, w = self.python, self.work
        ckpt, qckpt = w / "full", w / "full-q"
        cli = [py, "-m", "kimivl_local.cli.main"]
        bench = cli + ["bench", str(qckpt), "--device", "cuda", "--prompt-tokens", "512",
                       "--gen-tokens", "128", "--json", str(w / f"{step.name}.json")]
        pytest = [py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
                  f"--junitxml={w / step.name}.xml"]
        return {
            "collect": ([py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only",
                         "-m", "gpu", "tests"], {}),
            "selftest": (cli + ["selftest", "--device", "cuda", "--json",
                                str(w / "selftest.json")], {}),
            "gpu_tests": (pytest + ["-m", "gpu", "tests", "--ignore=tests/test_gpu_model.py"],
                          {}),
            "cuda_host_tests": (pytest + ["-m", "not gpu", "tests/test_cuda_quant.py",
                                          "tests/test_cuda_lowbit.py",
                                          "tests/test_cuda_attention.py"], {}),
            "model_tests": (pytest + ["tests/test_gpu_model.py"], {}),
            "attention_bench": ([py, "bench/attention_cases.py", "--device", "cuda", "--budget",
                                 "1", "--json", str(w / "attention.json")], {}),
            "kernels_bench": ([py, "bench/kernels.py", "--device", "cuda", "--quick", "--json",
                               str(w / "kernels.json")], {}),
            "synthetic": (cli + ["synthetic", str(ckpt), "--preset", "full", "--layers",
                                 str(self.args.layers)], {}),
            "quantize": (cli + ["quantize", str(ckpt), str(qckpt), "--recipe", "default"], {}),
            "bench_graphs": (bench, {}),
            "bench_eager": (bench, {"KIMIVL_CUDA_GRAPHS": "0"}),
            "bench_cpu_experts": (bench + ["--cpu-experts", "1"], {}),
            "memory_32k": ([py, "bench/gpu_memory.py", str(qckpt), "--context", "32768",
                            "--json", str(w / "memory_32k.json")], {}),
            "memcheck": (["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "86",
                          "--print-limit", "20"] + cli + ["selftest", "--device", "cuda"],
                         {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
        }[step.name]

    def check_command(self, step: Step) -> list[str] | None:
        """Dry run: the files a step's command names exist and kimivl-local argv parses."""
        if step.name in ("build", "build_info", "device_build"):
            return None
        cmd, _ = self.command(step)
        for arg in cmd:
            if arg.startswith(("bench/", "tests/")) and not (REPO / arg).exists():
                raise ValueError(f"{step.name} names {arg}, which does not exist")
        if "kimivl_local.cli.main" in cmd:
            argv = cmd[cmd.index("kimivl_local.cli.main") + 1:]
            if argv[0] == "quantize":
                from kimivl_local.quantize.main import _parser as quantize_parser
                quantize_parser().parse_args(argv[1:])
            else:
                from kimivl_local.cli.main import _parser
                _parser().parse_args(argv)
        return cmd

    def simple(self, step: Step, timeout: float) -> Result:
        cmd, env = self.command(step)
        rc, text = self.sh(step, cmd, timeout, env)
        result = Result(step.name, _status(rc), command=cmd, reason=_reason(rc, text))
        return result

    # ---- steps ---------------------------------------------------------------------------

    def step_env(self, step, timeout) -> Result:
        figures = {"python": sys.version.split()[0], "executable": sys.executable,
                   "cpu_count": os.cpu_count(), "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
                   "commit": _commit()}
        for name, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,"
                                          "memory.total,compute_cap,clocks.max.sm,"
                                          "clocks.max.mem", "--format=csv,noheader"]),
                          ("nvcc", ["nvcc", "--version"]),
                          ("compute_sanitizer", ["compute-sanitizer", "--version"])):
            if shutil.which(cmd[0]) is None:
                figures[name] = None
                continue
            rc, text = self.sh(step, cmd, 30)
            figures[name] = text.strip().splitlines()[-1] if rc == 0 and text.strip() else None
        probe = ("import json, importlib.metadata as md, importlib.util as iu\n"
                 "def version(m):\n"
                 "    if iu.find_spec(m) is None:\n"
                 "        return None\n"
                 "    try:\n"
                 "        return md.version({'PIL': 'pillow'}.get(m, m))\n"
                 "    except md.PackageNotFoundError:\n"
                 "        return 'present'\n"
                 f"mods = {{m: version(m) for m in {list(REQUIRED + BUILD_REQUIRED + OPTIONAL)!r}}}\n"
                 "import torch\n"
                 "cuda = torch.cuda.is_available()\n"
                 "d = {'torch': torch.__version__, 'torch_cuda': torch.version.cuda,\n"
                 "     'cuda_available': cuda, 'modules': mods}\n"
                 "if cuda:\n"
                 "    p = torch.cuda.get_device_properties(0)\n"
                 "    d.update(gpu=p.name, capability=f'{p.major}.{p.minor}',\n"
                 "             gpu_memory_bytes=p.total_memory,\n"
                 "             multiprocessors=p.multi_processor_count)\n"
                 "print('ENV ' + json.dumps(d))\n")
        rc, text = self.sh(step, [self.python, "-c", probe], timeout)
        line = next((ln for ln in text.splitlines() if ln.startswith("ENV ")), None)
        if line is None:
            return Result(step.name, "fail", reason=_reason(rc, text), figures=figures)
        figures.update(json.loads(line[4:]))
        needed = REQUIRED if self.args.dry_run else REQUIRED + BUILD_REQUIRED
        missing = [m for m in needed if figures["modules"].get(m) is None]
        if missing:
            return Result(step.name, "fail", figures=figures,
                          reason=f"missing {', '.join(missing)}: carry wheels (bench/gpu_prep.sh)")
        if not self.args.dry_run and not figures["cuda_available"]:
            return Result(step.name, "fail", figures=figures, reason="torch sees no CUDA GPU")
        self.capability = figures.get("capability")
        return Result(step.name, "pass", figures=figures)

    def step_build(self, step, timeout) -> Result:
        """Install the package with the carried extension (prebuilt) or compile it here
        (device); in auto mode a prebuilt that does not import falls back to compiling."""
        prebuilt = Path(self.args.prebuilt) / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
        mode = self.args.build
        if mode == "auto":
            mode = "prebuilt" if prebuilt.is_file() else "device"
        if mode == "prebuilt" and not prebuilt.is_file():
            return Result(step.name, "fail", reason=f"no {prebuilt}: run bench/gpu_prep.sh "
                          "here and carry .prebuilt")
        figures = {"mode": mode}
        if mode == "prebuilt":
            result = self.install(step, timeout, prebuilt, figures)
            if result.status == "pass" or self.args.build == "prebuilt":
                return result
            figures["prebuilt_error"] = result.reason  # auto: compile here instead
            mode = figures["mode"] = "device"
        self.build_mode = mode
        return self.install(step, self.remaining() - 5, None, figures)

    def install(self, step, timeout, prebuilt: Path | None, figures: dict) -> Result:
        for old in (REPO / "kimivl_local").glob("_C.*"):
            old.unlink()  # an extension from another build must not shadow this one
        pip = [self.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
               "--no-index", "-e", "."]
        if prebuilt is not None:
            env = {"KIMIVL_SKIP_EXT": "1"}
        else:
            env = {"KIMIVL_CUDA": "on", "KIMIVL_CUDA_ARCHS": self.arch(),
                   "KIMIVL_BUILD_JOBS": str(os.cpu_count() or 1)}
        rc, text = self.sh(step, pip, timeout, env)
        if rc != 0:
            return Result(step.name, _status(rc), command=pip, figures=figures,
                          reason=_reason(rc, text))
        if prebuilt is not None:
            self.build_mode = "prebuilt"
            shutil.copy2(prebuilt, REPO / "kimivl_local" / prebuilt.name)
            stamp = prebuilt.parent / "COMMIT"
            figures["prebuilt_commit"] = stamp.read_text().strip() if stamp.exists() else None
            check = [self.python, "-c", "import kimivl_local._C as c; "
                     "assert c.build_info()['cuda'], 'built without CUDA'"]
            rc, text = self.sh(step, check, 60, cwd=self.work)
            if rc != 0:
                return Result(step.name, "fail", command=check, figures=figures,
                              reason="the prebuilt extension does not load here: "
                                     + _reason(rc, text))
        return Result(step.name, "pass", command=pip, figures=figures)

    def arch(self) -> str:
        cap = getattr(self, "capability", None) or "9.0"
        return cap.replace(".", "")

    def step_build_info(self, step, timeout) -> Result:
        code = ("import json, torch\nfrom kimivl_local.kernels.extension import build_info\n"
                "i = build_info()\n"
                "print('INFO ' + json.dumps(i, default=str))\n"
                "assert i['available'], i.get('error')\nassert i['cuda'], 'built without CUDA'\n"
                "major, minor = torch.cuda.get_device_capability()\n"
                "print('CAPABILITY', major * 10 + minor)\n")
        cmd = [self.python, "-c", code]
        rc, text = self.sh(step, cmd, timeout, cwd=self.work)  # not the source tree: the install
        line = next((ln for ln in text.splitlines() if ln.startswith("INFO ")), None)
        figures = json.loads(line[5:]) if line else {}
        reason = _reason(rc, text)
        cap = re.search(r"CAPABILITY (\d+)", text)
        archs = str(figures.get("cuda_archs", ""))
        if rc == 0 and cap and cap.group(1) not in archs:
            return Result(step.name, "fail", command=cmd, figures=figures,
                          reason=f"built for {archs}, not this GPU's sm_{cap.group(1)}")
        return Result(step.name, _status(rc), command=cmd, figures=figures, reason=reason)

    def step_collect(self, step, timeout) -> Result:
        result = self.simple(step, timeout)
        rc_text = self.output.get(step.name, "")
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", rc_text)
        result.figures = {"collected": int(m.group(1)) if m else None}
        if result.status == "pass" and not result.figures["collected"]:
            result.status, result.reason = "fail", "no gpu test collected"
        return result

    def step_selftest(self, step, timeout) -> Result:
        result = self.simple(step, timeout)
        result.figures = _read_json(self.work / "selftest.json")
        return result

    def tests(self, step, timeout) -> Result:
        result = self.simple(step, timeout)
        result.figures = _junit(self.work / f"{step.name}.xml")
        if result.status == "pass" and not result.figures.get("passed"):
            result.status, result.reason = "fail", "nothing passed (all skipped?)"
        return result

    step_gpu_tests = step_cuda_host_tests = step_model_tests = tests

    def step_attention_bench(self, step, timeout) -> Result:
        result = self.simple(step, timeout)
        result.figures = {"records": _read_json(self.work / "attention.json")}
        return result

    def step_kernels_bench(self, step, timeout) -> Result:
        result = self.simple(step, timeout)
        path = self.work / "kernels.json"
        result.figures = {"records": _read_json(path)}
        return result

    def step_synthetic(self, step, timeout) -> Result:
        shutil.rmtree(self.work / "full", ignore_errors=True)
        result = self.simple(step, timeout)
        result.figures = {"layers": self.args.layers, "bytes": _folder_bytes(self.work / "full")}
        return result

    def step_quantize(self, step, timeout) -> Result:
        shutil.rmtree(self.work / "full-q", ignore_errors=True)
        result = self.simple(step, timeout)
        result.figures = {"bytes": _folder_bytes(self.work / "full-q")}
        if result.status == "pass":
            shutil.rmtree(self.work / "full", ignore_errors=True)  # disk for what follows
        return result

    def bench(self, step, timeout) -> Result:
        result = self.simple(step, timeout)
        result.figures = _read_json(self.work / f"{step.name}.json") or {}
        if step.name == "bench_graphs":  # did the decode step run as a CUDA graph at all?
            result.figures["graph_note"] = _grep(self.output.get(step.name, ""), "CUDA graph")
        return result

    step_bench_graphs = step_bench_eager = step_bench_cpu_experts = bench

    def step_memory_32k(self, step, timeout) -> Result:
        result = self.simple(step, timeout)
        result.figures = _read_json(self.work / "memory_32k.json") or {}
        return result

    def step_memcheck(self, step, timeout) -> Result:
        if shutil.which("compute-sanitizer") is None:
            return Result(step.name, "skip", reason="compute-sanitizer is not on PATH")
        result = self.simple(step, timeout)
        text = self.output.get(step.name, "")
        m = re.search(r"ERROR SUMMARY: (\d+) error", text)
        result.figures = {"errors": int(m.group(1)) if m else None}
        return result

    def step_device_build(self, step, timeout) -> Result:
        if getattr(self, "build_mode", None) != "prebuilt":
            return Result(step.name, "skip", reason="the build step already compiled here")
        dst = self.work / "wheel"
        shutil.rmtree(dst, ignore_errors=True)
        cmd = [self.python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "-w", str(dst), "."]
        env = {"KIMIVL_CUDA": "on", "KIMIVL_CUDA_ARCHS": self.arch(),
               "KIMIVL_BUILD_JOBS": str(os.cpu_count() or 1)}
        rc, text = self.sh(step, cmd, timeout, env)
        return Result(step.name, _status(rc), command=cmd, reason=_reason(rc, text))

    # ---- reporting -----------------------------------------------------------------------

    def ok(self) -> bool:
        bad = ("fail", "timeout", "blocked")
        return not any(r.status in bad for r in self.results.values())

    def write_summary(self) -> None:
        summary = {
            "dry_run": self.args.dry_run, "budget_seconds": self.args.budget,
            "layers": self.args.layers, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                   time.gmtime()),
            "ok": self.ok(),
            "steps": [{"name": r.name, "status": r.status, "seconds": r.seconds,
                       "reason": r.reason, "command": r.command, "figures": r.figures}
                      for r in self.results.values()],
        }
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
        tmp.replace(self.out / "summary.json")

    def table(self) -> str:
        lines = [f"{'step':<18}{'status':<9}{'s':>7}  reason"]
        for r in self.results.values():
            lines.append(f"{r.name:<18}{r.status:<9}{r.seconds:>7.1f}  {r.reason[:90]}")
        lines.append(f"summary: {self.out / 'summary.json'}  ok: {self.ok()}")
        return "\n".join(lines)


# Imports the GPU tests and the steps need (the device image has them; see KINDS.md), and
# optional ones whose absence only skips tests.
REQUIRED = ("torch", "numpy", "safetensors", "tiktoken", "regex", "PIL", "tqdm", "pytest")
BUILD_REQUIRED = ("setuptools", "pybind11")  # to install the package there (not in a dry run)
OPTIONAL = ("hypothesis", "transformers", "pexpect", "pypdfium2", "av", "gradio")


def _status(rc: int | None) -> str:
    return "timeout" if rc is None else "pass" if rc == 0 else "fail"


def _reason(rc: int | None, text: str) -> str:
    if rc == 0:
        return ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return ("timed out; " if rc is None else f"exit {rc}; ") + last[:300]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _junit(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                               "kind": kind, "message": (node.get("message") or "")[:500]})
    counts["failed_tests"] = failed
    counts["durations"] = sorted(((float(c.get("time", 0)), c.get("name"))
                                  for c in suite.iter("testcase")), reverse=True)[:10]
    return counts


def _folder_bytes(path: Path) -> int | None:
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _grep(text: str, needle: str) -> list[str]:
    return [ln.strip()[:300] for ln in text.splitlines() if needle in ln][:5]


def _commit() -> str | None:
    stamp = PREBUILT / "COMMIT"
    if stamp.exists():
        return stamp.read_text().strip()
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench/out/gpu-session"))
    parser.add_argument("--work", default="/tmp/kimivl-gpu-session",
                        help="scratch folder: checkpoints, raw JSON, junit files")
    parser.add_argument("--budget", type=float, default=540,
                        help="seconds for all steps (default 540: one 600 s call with room)")
    parser.add_argument("--layers", type=int, default=4,
                        help="decoder layers of the full-width synthetic checkpoint (27: all)")
    parser.add_argument("--build", choices=("auto", "prebuilt", "device"), default="auto")
    parser.add_argument("--prebuilt", default=str(PREBUILT),
                        help="folder of the carried extension (default .prebuilt)")
    parser.add_argument("--only", help="comma-separated step names to run (default: all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the steps that need no GPU, check the others' commands")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    args = parser.parse_args(argv)
    if args.list:
        for s in STEPS:
            print(f"{s.name:<18} ~{s.estimate:>4}s (limit {s.timeout}s)  {s.what}")
        print(f"estimated total: {sum(s.estimate for s in STEPS)}s")
        return 0
    return Session(args).run()


if __name__ == "__main__":
    sys.exit(main())
