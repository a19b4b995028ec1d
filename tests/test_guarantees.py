"""README "Guarantees", each held by a test that fails when the behaviour breaks: output folders are probed
before any work, `--overwrite` and killed swaps leave no leftovers, a damaged checkpoint is refused by its hash,
and tasks can be added and removed while other threads classify and generate."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mpt_edge_runtime as mer
from conftest import VOCAB
from mpt_edge.atomic import OutputError, check_writable
from mpt_edge.checkpoint import CheckpointError, load_checkpoint
from mpt_edge.shipped import shipped_recipe
from mpt_edge_export.bundle_writer import ExportTask, write_task_file
from test_cli import FAST, common, invoke
from test_generation import bundle as decoder_bundle  # noqa: F401  (module fixture: causal bundle with generation)

MISSING = "/nonexistent/mpt-edge"   # data, backbone and checkpoint that would fail if the probe did not come first


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# ---- 1. output folders are probed before any work ----------------------------------------------------------------

def test_the_probe_creates_a_missing_folder_and_leaves_nothing_in_it(tmp_path):
    folder = check_writable(tmp_path / "a" / "b")
    assert folder.is_dir() and not any(folder.iterdir())


def test_a_probe_that_does_not_keep_removes_only_the_folders_it_created(tmp_path):
    check_writable(tmp_path / "a" / "b" / "c", keep=False)
    assert not (tmp_path / "a").exists() and tmp_path.is_dir()


def test_the_probe_fsyncs_and_a_failing_fsync_is_the_output_error(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    check_writable(tmp_path)
    assert synced

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=rf"^cannot write {tmp_path}: No space left on device; the disk is full"):
        check_writable(tmp_path)
    assert not any(tmp_path.iterdir())


COMMANDS = ["train teachers", "train source", "train source --recipe", "train target", "export", "import-peft",
            "export-peft", "data fetch", "quickstart"]


def writing_commands(root: Path) -> dict[str, tuple[list, Path]]:
    """Every command that writes → (arguments with an output under a file, the folder the error must name). Their
    inputs do not exist, so a command that did any work before probing its output would fail differently."""
    blocked = root / "a-file"
    recipe = root / "recipe.toml"
    recipe.write_text(shipped_recipe("minilm-l6").read_text().replace('backbone = "minilm-l6"', f'backbone = "{MISSING}"'))
    out = blocked / "out"
    return {
        "train teachers": (["train", "teachers", "--tasks", "polarity", "--out", out, "--data", MISSING,
                            "--backbone", MISSING], out),
        "train source": (["train", "source", "--teachers", MISSING, "--out", out, "--backbone", MISSING], out),
        "train source --recipe": (["train", "source", "--recipe", recipe, "--out", out, "--work", root / "work",
                                   "--data", MISSING], out),
        "train target": (["train", "target", "--tasks", "mood", "--method", "pt", "--out", out, "--data", MISSING,
                          "--backbone", MISSING], out),
        "export": (["export", MISSING, "--out", out, "--backbone", MISSING], blocked),
        "import-peft": (["import-peft", MISSING, "--out", out, "--backbone", MISSING], out),
        "export-peft": (["export-peft", MISSING, "--out", out, "--backbone", MISSING], blocked),
        "data fetch": (["data", "fetch", "--tasks", "no-such-task", "--data", out], out),
        "quickstart": (["quickstart", "--out", out, "--backbone", MISSING], out),
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_every_writing_command_probes_its_output_before_any_work(tmp_path, command):
    (tmp_path / "a-file").write_text("in the way")
    args, named = writing_commands(tmp_path)[command]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: cannot write {named}: "), result.output
    assert "a file is in the way of the folder: choose another output folder" in result.output
    assert result.output.count("\n") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "recipe.toml"]


def test_the_command_list_is_every_command_that_writes(tmp_path):
    assert sorted(writing_commands(tmp_path)) == sorted(COMMANDS)


def obey_file_permissions() -> None:
    """preexec_fn: drop the capabilities that let root ignore file modes (bounding set, so the exec'd program
    has none of them); a no-op for other users, whom the modes bind anyway."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):          # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:   # PR_CAPBSET_DROP
            os._exit(97)


def run_cli(command: list, preexec_fn=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in command], env=child_env(), capture_output=True, text=True,
                          preexec_fn=preexec_fn, timeout=timeout)


@pytest.mark.parametrize("command", ["train teachers", "export"])
def test_an_existing_folder_without_write_permission_fails_before_any_work(tmp_path, command):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    out = {"train teachers": folder, "export": folder / "bundle"}[command]
    args = {"train teachers": ["train", "teachers", "--tasks", "polarity", "--out", out, "--data", MISSING,
                               "--backbone", MISSING],
            "export": ["export", MISSING, "--out", out, "--backbone", MISSING]}[command]
    try:
        result = run_cli([sys.executable, "-m", "mpt_edge", *args], preexec_fn=obey_file_permissions)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"error: cannot write {folder}: Permission denied; permission denied: choose a folder "
                             "you can write to. Anything saved before is unchanged\n")
    assert not any(folder.iterdir())


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_a_read_only_or_full_filesystem_fails_before_any_work(tmp_path, kind):
    """A real tmpfs, mounted in a private mount namespace of the child (needs root or CAP_SYS_ADMIN: else skipped)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a test filesystem")
    folder = tmp_path / kind
    folder.mkdir()
    options, fill = {"read-only": ("ro,size=1m", ""), "full": ("size=64k", 'head -c 1M /dev/zero > "$2/fill" 2>/dev/null; ')}[kind]
    script = f'mount -t tmpfs -o "$1" tmpfs "$2" || exit 97; {fill}shift 2; exec "$@"'
    result = run_cli(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", options, folder,
                      sys.executable, "-m", "mpt_edge", "train", "teachers", "--tasks", "polarity", "--out", folder,
                      "--data", MISSING, "--backbone", MISSING])
    if result.returncode == 97 or result.stderr.startswith("unshare:"):
        pytest.skip(f"cannot mount a test filesystem here: {result.stderr.strip()}")
    reason = {"read-only": "Read-only file system; the filesystem is read-only: choose a writable output folder",
              "full": "No space left on device; the disk is full: free space or choose another output folder"}[kind]
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"error: cannot write {folder}: {reason}. Anything saved before is unchanged\n"


# ---- 2. --overwrite and what a killed swap leaves ------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(workspace):
    """Two tiny teacher checkpoints (task polarity, task topic) trained through the command line."""
    runs = {}
    for task in ("polarity", "topic"):
        runs[task] = workspace / "guarantees" / task
        result = invoke("train", "teachers", "--tasks", task, "--out", runs[task], *common(workspace), *FAST)
        assert result.exit_code == 0, result.output
    return runs


@pytest.fixture(scope="module")
def first_bundle(workspace, checkpoints):
    """The polarity checkpoint exported once; tests copy it."""
    out = workspace / "guarantees" / "bundle"
    result = export(workspace, checkpoints["polarity"], out)
    assert result.exit_code == 0, result.output
    return out


def export(workspace, checkpoint, out, *extra):
    return invoke("export", checkpoint, "--out", out, "--backbone", workspace / "tiny-llama", *extra)


def bundle_tasks(folder: Path) -> list[str]:
    return mer.load(folder, "cpu").tasks


def beside(out: Path) -> list[str]:
    """What export leaves next to the bundle (temp or set-aside folders)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_overwrite_replaces_the_bundle_and_leaves_nothing_beside_it(workspace, checkpoints, first_bundle, tmp_path):
    out = shutil.copytree(first_bundle, tmp_path / "bundle")
    refused = export(workspace, checkpoints["topic"], out)
    assert refused.exit_code == 1 and "already exists; pass --overwrite" in refused.output
    assert bundle_tasks(out) == ["polarity"]
    result = export(workspace, checkpoints["topic"], out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert bundle_tasks(out) == ["topic"] and beside(out) == []


# Runs `mpt-edge ARGS` and SIGKILLs itself at one point of the bundle swap: "aside" right after the old bundle was
# renamed to .NAME.old-PID (before the new one is in place), "delete" as that old bundle is about to be deleted.
KILLED_SWAP = """
import os, shutil, signal, sys
from mpt_edge.cli import app

point, real_replace, real_rmtree = sys.argv[1], os.replace, shutil.rmtree

def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if point == "aside" and ".old-" in str(dst):
        os.kill(os.getpid(), signal.SIGKILL)

def rmtree(path, *args, **kwargs):
    if point == "delete" and ".old-" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)

os.replace, shutil.rmtree = replace, rmtree
app(sys.argv[2:], prog_name="mpt-edge")
"""


@pytest.mark.parametrize("point, left, kept", [("aside", [".bundle.old", ".bundle.tmp"], "polarity"),
                                               ("delete", [".bundle.old"], "topic")])
def test_a_swap_killed_midway_is_repaired_by_the_next_export(workspace, checkpoints, first_bundle, tmp_path, point,
                                                            left, kept):
    """Killed after moving the old bundle aside: the next export puts it back. Killed after the new one is in
    place: the next export deletes the old one. Either way nothing is left beside the bundle."""
    out = shutil.copytree(first_bundle, tmp_path / "bundle")
    child = run_cli([sys.executable, "-c", KILLED_SWAP, point, "export", checkpoints["topic"], "--out", out,
                     "--backbone", workspace / "tiny-llama", "--overwrite"], timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert [name.split("-")[0] for name in beside(out)] == left
    assert out.exists() == (point == "delete")
    refused = export(workspace, checkpoints["topic"], out)       # repairs first, then refuses to overwrite
    assert refused.exit_code == 1 and "already exists; pass --overwrite" in refused.output
    assert bundle_tasks(out) == [kept] and beside(out) == []


# ---- 3. a damaged checkpoint is refused by its hash ----------------------------------------------------------------

def test_a_flipped_byte_in_the_checkpoint_tensors_is_refused_by_name(workspace, checkpoints, tmp_path):
    damaged = shutil.copytree(checkpoints["polarity"], tmp_path / "damaged")
    (tensors,) = damaged.glob("state-*.safetensors")
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF                      # a tensor value, not the header: safetensors alone would load it
    tensors.write_bytes(bytes(data))
    message = f"{tensors}: sha256 does not match checkpoint.json; the file is damaged, retrain or restore it"
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(damaged)
    assert str(caught.value) == message
    resumed = invoke("train", "teachers", "--tasks", "polarity", "--out", damaged, *common(workspace), *FAST, "--resume")
    exported = export(workspace, damaged, tmp_path / "bundle")
    for result in (resumed, exported):   # (before the error: the backbone's loading bar on stderr)
        assert result.exit_code == 1 and result.output.splitlines()[-1] == f"error: {message}", result.output
        assert result.output.count("error:") == 1
    assert not (tmp_path / "bundle").exists()


# ---- 7. hot add_task / remove_task while other threads classify and generate ---------------------------------------

def hot_task(backbone, length: int, name: str, kind: str, seed: int) -> ExportTask:
    dim = backbone.model.get_input_embeddings().embedding_dim
    g = torch.Generator().manual_seed(seed)
    labels = ["negative", "positive"] if kind == "classify" else []
    head = backbone.model.get_output_embeddings().weight[[VOCAB.index(w) for w in labels]].numpy().reshape(len(labels), dim)
    spec = {"name": name, "kind": kind, "template": "{text} :", "group": 0, "max_length": 16, "labels": labels,
            "verbalizers": labels}
    return ExportTask(spec, (1 + 0.3 * torch.randn(length, 1, generator=g)).numpy(),
                      (1 + 0.3 * torch.randn(1, dim, generator=g)).numpy(), head, np.zeros(len(labels), np.float32))


def test_hot_add_and_remove_race_with_classify_and_generate(decoder_bundle, tmp_path):  # noqa: F811
    backbone, folder, manifest = decoder_bundle
    engine = mer.load(folder, "cpu", threads=1)
    files = {}
    for name, kind, seed in (("hot", "classify", 7), ("hot-gen", "generate", 8)):
        files[name] = tmp_path / f"{name}.safetensors"
        write_task_file(files[name], hot_task(backbone, manifest["prompt"]["length"], name, kind, seed))
    texts = ["the film was good", "a very dull story"]
    calls = {"mood": lambda: [p.probabilities for p in engine.classify("mood", texts)],
             "echo": lambda: engine.generate("echo", texts, max_new_tokens=3),
             "hot": lambda: [p.probabilities for p in engine.classify("hot", texts * 16)],  # many rows: many lookups
             "hot-gen": lambda: engine.generate("hot-gen", texts, max_new_tokens=3)}
    for name, path in files.items():
        engine.add_task(name, path)
    expected = {name: call() for name, call in calls.items()}        # single-threaded answers
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                                         # switch threads as often as possible
    done, errors, outcomes = threading.Event(), [], {name: [] for name in calls}

    def swap() -> None:
        """Six rounds of: add the hot tasks, wait until a call on each succeeded, then remove and re-add them
        40 times in a row, remove them."""
        try:
            for _ in range(6):
                seen = {name: len(outcomes[name]) for name in files}
                for name, path in files.items():
                    engine.add_task(name, path)
                deadline = time.monotonic() + 60
                while any(True not in outcomes[n][seen[n]:] for n in files) and time.monotonic() < deadline:
                    time.sleep(0.001)
                for _ in range(40):
                    for name, path in files.items():
                        engine.remove_task(name)
                        engine.add_task(name, path)
                for name in files:
                    engine.remove_task(name)
                time.sleep(0.005)
        except Exception as err:  # noqa: BLE001
            errors.append(repr(err))
        finally:
            done.set()

    def serve(name: str) -> None:
        while not done.is_set():
            try:
                outcomes[name].append(calls[name]() == expected[name])
            except mer.UnknownTaskError as err:
                if name not in files or err.name != name:
                    errors.append(repr(err))
                outcomes[name].append("unknown")
            except Exception as err:  # noqa: BLE001  (anything else is the failure this test looks for)
                errors.append(repr(err))
                return

    readers = ["mood", "echo", "hot", "hot", "hot", "hot-gen"]      # most calls where the table changes
    threads = [threading.Thread(target=swap)] + [threading.Thread(target=serve, args=(n,)) for n in readers]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    for name in ("mood", "echo"):
        assert outcomes[name] and all(ok is True for ok in outcomes[name]), name
    for name in files:                                              # served while present, refused once removed
        assert set(outcomes[name]) == {True, "unknown"}, name
    assert engine.tasks == ["chat", "echo", "mood"]
