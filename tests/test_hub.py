"""Repo ids end to end against a local stand-in for the Hub (tests/hub_support.py): the real
huggingface_hub client code runs in a `kimivl-local` subprocess whose HF_ENDPOINT points at
127.0.0.1 and whose HF_HOME is a temporary folder; nothing reaches the internet."""

import os
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")  # drives the CLI at a terminal

from hub_support import FakeHub, repo_from_folder
from conftest import CLI_CWD

COMMIT = "a" * 40
COMMIT_V1 = "b" * 40
RUNTIME_FILES = None  # the tiny checkpoint's file names, filled by the fixture
SHARD = "model-00002-of-00006.safetensors"
# Where a dropped download resumes: huggingface_hub writes the body in chunks of
# constants.DOWNLOAD_CHUNK_SIZE (10 MiB), so the tiny checkpoint's shards need smaller chunks
# for a resume to start past byte 0. Only the downloads run through _cli(..., chunk=...) do.
CHUNK = 1 << 16


@pytest.fixture
def hub(tiny_checkpoint):
    server = FakeHub()
    extra = {"modeling_kimi_vl.py": b"raise SystemExit('never run')\n",
             "pytorch_model.bin": b"\x80pickle", "README.md": b"# tiny\n"}
    server.repos["org/tiny"] = repo_from_folder(tiny_checkpoint, COMMIT, extra)
    server.repos["org/tiny"].revisions["v1"] = COMMIT_V1
    server.repos["org/code"] = repo_from_folder(tiny_checkpoint, COMMIT)
    server.repos["org/code"].files = {"config.json": b"{}", "modeling_kimi_vl.py": b"pass\n",
                                      "pytorch_model.bin": b"\x80pickle"}
    with server:
        yield server


@pytest.fixture
def env(hub, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "KIMIVL_CACHE", "KIMIVL_HOST"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               KIMIVL_CACHE=str(tmp_path / "kimivl-cache"))
    return env


def _cli(env, *args, chunk=None, timeout=120):
    pre = (f"import huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = {chunk}; "
           if chunk else "")
    code = pre + "import sys; from kimivl_local.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout, cwd=CLI_CWD)


def _snapshots(env, repo="org/tiny") -> Path:
    return Path(env["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots"


def test_server_binds_loopback_only(hub):
    assert hub.server.server_address[0] == "127.0.0.1"


def test_download_fetches_only_runtime_files_and_resumes_a_dropped_connection(
        hub, env, tiny_checkpoint):
    hub.drop_after[SHARD] = 100_000  # the connection drops after 100 kB of this ~200 kB shard
    result = _cli(env, "download", "org/tiny", chunk=CHUNK)
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder == _snapshots(env) / COMMIT
    # Every file the runtime reads, byte for byte; no code, no pickle, no docs.
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in
                                                              tiny_checkpoint.iterdir())
    for p in tiny_checkpoint.iterdir():
        assert (folder / p.name).read_bytes() == p.read_bytes(), p.name
    fetched = {path.rpartition("/")[2] for _, path, _ in hub.file_requests()}
    assert not fetched & {"modeling_kimi_vl.py", "pytorch_model.bin", "README.md"}
    # The dropped shard resumed from the bytes already written, not from scratch.
    gets = [rng for method, path, rng in hub.file_requests()
            if method == "GET" and path.endswith(SHARD)]
    assert gets == [None, f"bytes={CHUNK}-"]
    assert "Fetching" in result.stderr and "100%" in result.stderr  # the progress bar
    assert "1.1 MB" in result.stderr and "skipping 3 files" in result.stderr


def test_code_only_repo_is_refused_before_any_file_is_fetched(hub, hf_cache, monkeypatch):
    import huggingface_hub.constants as constants

    from kimivl_local.checkpoint.hub import remote_repo
    from kimivl_local.errors import InputError

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # HfApi reads it per instance
    with pytest.raises(InputError, match="no safetensors checkpoint") as refused:
        remote_repo("org/code")
    assert "modeling_kimi_vl.py" in str(refused.value) and "pickled .bin" in str(refused.value)
    remote = remote_repo("org/tiny", "v1")
    assert remote.commit == COMMIT_V1 and "modeling_kimi_vl.py" in remote.skipped
    assert set(remote.files) == {n for n in hub.repos["org/tiny"].files if n.endswith(
        (".safetensors", ".json", "tiktoken.model"))}
    assert not hub.file_requests()


@pytest.mark.slow
def test_code_only_repo_is_refused(hub, env):
    for args in (["download", "org/code"],
                 ["generate", "org/code", "--download", "-p", "hi", "--device", "cpu"]):
        result = _cli(env, *args)
        assert result.returncode == 2, result.stderr
        assert "no safetensors checkpoint" in result.stderr
        assert "never runs a repo's code" in result.stderr
        assert "Traceback" not in result.stderr
    assert not hub.file_requests()
    assert not _snapshots(env, "org/code").parent.exists()


def test_not_cached_without_a_terminal_refuses_with_the_commands(hub, env):
    result = _cli(env, "generate", "org/tiny", "-p", "hi")
    assert result.returncode == 2
    assert "not in the local Hugging Face cache" in result.stderr
    assert "`kimivl-local download org/tiny`" in result.stderr and "--download" in result.stderr
    assert hub.requests == []  # nothing asked, nothing fetched
    assert not Path(env["HF_HOME"]).exists() or not any(Path(env["HF_HOME"]).rglob("models--*"))


@pytest.mark.slow
def test_offline_mode_is_honoured(hub, env):
    offline = dict(env, HF_HUB_OFFLINE="1")
    for args in (["generate", "org/tiny", "--download", "-p", "hi"], ["download", "org/tiny"]):
        result = _cli(offline, *args)
        assert result.returncode == 2 and "HF_HUB_OFFLINE" in result.stderr, result.stderr
    assert hub.requests == []


def _spawn(env, *args) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "kimivl_local.cli.main", *args], env=env,
                         encoding="utf-8", timeout=120, dimensions=(40, 200), cwd=CLI_CWD)


@pytest.mark.slow
def test_prompt_no_leaves_nothing_then_yes_downloads_and_later_runs_are_offline(hub, env):
    gen = ["generate", "org/tiny", "-p", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    child = _spawn(env, *gen)
    child.expect(r"1\.1 MB")  # the size, asked before anything is fetched
    child.expect(r"Download 1\.1 MB now\? \[y/N\] ")
    child.sendline("n")
    child.expect("not downloaded")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert not hub.file_requests() and not _snapshots(env).parent.exists()

    child = _spawn(env, *gen)
    child.expect(r"Download 1\.1 MB now\? \[y/N\] ")
    child.sendline("y")
    child.expect(r"2 generated")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (_snapshots(env) / COMMIT / "config.json").is_file()

    hub.requests.clear()  # the second run starts from the cache without asking the Hub
    for run_env in (env, dict(env, HF_HUB_OFFLINE="1")):
        result = _cli(run_env, *gen)
        assert result.returncode == 0, result.stderr
        assert "2 generated" in result.stderr and "Download" not in result.stderr
    assert hub.requests == []


@pytest.mark.slow
def test_revision_is_resolved_and_cached_per_commit(hub, env):
    result = _cli(env, "download", "org/tiny", "--revision", "v1")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip().splitlines()[-1]) == _snapshots(env) / COMMIT_V1
    hub.requests.clear()
    offline = dict(env, HF_HUB_OFFLINE="1")
    ok = _cli(offline, "generate", "org/tiny", "--revision", "v1", "-p", "hi",
              "--max-new-tokens", "1", "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    assert f"snapshots/{COMMIT_V1}" in ok.stderr  # the `loaded ...` line names the folder
    main = _cli(offline, "generate", "org/tiny", "-p", "hi", "--device", "cpu")
    assert main.returncode == 2 and "not in the local Hugging Face cache" in main.stderr
    assert hub.requests == []
    missing = _cli(env, "download", "org/tiny", "--revision", "nope")
    assert missing.returncode == 2 and "has no revision 'nope'" in missing.stderr


def _hf_script() -> str:
    """The console script huggingface_hub installs, as the installed metadata names it."""
    names = [e.name for e in metadata.distribution("huggingface_hub").entry_points
             if e.group == "console_scripts" and e.name in ("hf", "huggingface-cli")]
    assert names, "huggingface_hub installs no download CLI"
    return names[0]


def test_not_cached_message_names_the_installed_hf_cli():
    from kimivl_local.checkpoint.hub import not_cached_message

    message = not_cached_message("org/tiny", "v1")
    script = _hf_script()
    assert f"`{script} download org/tiny --revision v1 --include '*.safetensors'" in message
    assert "`kimivl-local download org/tiny --revision v1`" in message
    if script != "huggingface-cli":
        assert "huggingface-cli" not in message


@pytest.mark.slow
def test_missing_weights_message_names_the_installed_hf_cli(hub, env):
    """Issue 13.3: the suggested command is the installed CLI's, and it works as printed."""
    result = _cli(env, "chat", "--model", "org/tiny")
    assert result.returncode == 2
    script = _hf_script()
    assert f"`{script} download org/tiny --include" in result.stderr
    if script != "huggingface-cli":
        assert "huggingface-cli" not in result.stderr
    command = result.stderr.split(f"`{script} download", 1)[1].split("`", 1)[0]
    exe = (shutil.which(script, path=str(Path(sys.executable).parent))
           or shutil.which(script))
    if exe is None:
        pytest.skip(f"the {script} script is not on PATH")
    ran = subprocess.run([exe, "download", *shlex.split(command)], env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert ran.returncode == 0, ran.stderr
    names = {p.name for p in (_snapshots(env) / COMMIT).iterdir()}
    assert "config.json" in names and "tiktoken.model" in names
    assert not names & {"modeling_kimi_vl.py", "pytorch_model.bin", "README.md"}
    # What it fetched is what our resolution counts as complete: a cached start follows.
    hub.requests.clear()
    info = _cli(dict(env, HF_HUB_OFFLINE="1"), "list")
    assert info.returncode == 0 and "org/tiny" in info.stdout
    assert hub.requests == []


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache for this process: huggingface_hub reads HF_HUB_CACHE at import, so the
    library's constant is patched (what snapshot_download reads at call time)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_repo_id_resolves_through_the_hf_cache(hf_cache, tiny_checkpoint):
    import kimivl_local
    from kimivl_local.checkpoint.hub import NotCachedError, locate, resolve_model_path
    from kimivl_local.errors import InputError

    with pytest.raises(NotCachedError, match="not in the local Hugging Face cache"):
        resolve_model_path("moonshotai/Kimi-VL-A3B-Instruct")
    # The layout older huggingface_hub versions (and other tools) leave: refs/main -> snapshot.
    repo = hf_cache / "models--moonshotai--Kimi-VL-A3B-Instruct"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in tiny_checkpoint.iterdir():  # snapshot files link into the repo's blobs/
        shutil.copyfile(f, repo / "blobs" / f"blob-{f.name}")
        (snap / f.name).symlink_to(f"../../blobs/blob-{f.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    located = locate("moonshotai/Kimi-VL-A3B-Instruct")
    assert (located.path, located.repo, located.commit) == (snap, "moonshotai/Kimi-VL-A3B-Instruct",
                                                             "abc123")
    assert kimivl_local.load("moonshotai/Kimi-VL-A3B-Instruct", device="cpu").path == snap
    with pytest.raises(NotCachedError):
        locate("moonshotai/Kimi-VL-A3B-Instruct", revision="v2")
    with pytest.raises(InputError, match="--revision v2 applies to Hugging Face repo ids"):
        locate(tiny_checkpoint, revision="v2")


def test_fetch_flags_on_every_command_that_loads():
    from kimivl_local.cli.main import _parser

    for command in ("chat", "generate", "serve"):
        args = _parser().parse_args([command, "org/tiny", "--download", "--fit",
                                     "--revision", "v1"])
        assert (args.download, args.fit, args.revision) == (True, True, "v1")
        args = _parser().parse_args([command, "org/tiny"])
        assert (args.download, args.fit, args.revision) == (False, False, None)


@pytest.mark.slow
def test_interrupted_download_is_incomplete_and_the_next_one_fetches_only_the_rest(hub, env):
    hub.fail_get.add(SHARD)
    failed = _cli(env, "download", "org/tiny")
    assert failed.returncode == 2 and "run the same command again" in failed.stderr
    assert "Traceback" not in failed.stderr
    # The files that arrived are kept, but the snapshot is not taken for a checkpoint.
    assert (_snapshots(env) / COMMIT / "config.json").is_file()
    assert not (_snapshots(env) / COMMIT / SHARD).exists()
    offline = _cli(dict(env, HF_HUB_OFFLINE="1"), "generate", "org/tiny", "-p", "hi")
    assert offline.returncode == 2 and "not in the local Hugging Face cache" in offline.stderr
    arrived = {p.name for p in (_snapshots(env) / COMMIT).iterdir()}
    hub.fail_get.clear()
    hub.requests.clear()
    again = _cli(env, "download", "org/tiny")
    assert again.returncode == 0, again.stderr
    wanted = {n for n in hub.repos["org/tiny"].files if n.endswith((".safetensors", ".json",
                                                                     "tiktoken.model"))}
    fetched = {path.rpartition("/")[2] for m, path, _ in hub.file_requests() if m == "GET"}
    assert SHARD in fetched and fetched == wanted - arrived  # nothing fetched twice
