"""Crash safety: SIGKILL during training or export, a full disk, a read-only folder. What was saved stays loadable."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mpt_edge.atomic import OutputError
from mpt_edge.checkpoint import load_checkpoint, save_checkpoint
from test_cli import FAST, common, invoke

LONG = ["--steps", "40", "--prompt-length", "4", "--max-length", "32", "--batch-size", "4", "--quiet",
        "--checkpoint-every", "3"]


def spawn(*args, log: Path) -> subprocess.Popen:
    """`python -m mpt_edge ARGS` with stderr to the file `log` (a pipe that nobody drains can fill up and block
    the child while the test polls it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "mpt_edge", *map(str, args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended before the kill point: {tail(log)}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the kill point was not reached in time")
        time.sleep(0.005)


def step_of(folder: Path) -> int:
    try:
        return load_checkpoint(folder)[0]["step"]
    except Exception:   # not there yet
        return 0


@pytest.mark.timeout(900)   # three training runs in child processes
def test_sigkill_during_training_then_resume_equals_an_uninterrupted_run(workspace, tmp_path):
    ws = workspace
    args = ["train", "teachers", "--tasks", "polarity,topic", *common(ws), *LONG]
    process = spawn(*args, "--out", tmp_path / "killed", log=tmp_path / "killed.log")
    wait_for(lambda: step_of(tmp_path / "killed") >= 9, process, tmp_path / "killed.log")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    index, _ = load_checkpoint(tmp_path / "killed")          # whatever moment it died at, the last one loads
    assert 9 <= index["step"] < 80
    result = invoke(*args, "--out", tmp_path / "killed")
    assert result.exit_code == 1 and "--resume" in result.output
    # the same thread count as the killed process, so that float round-off matches too
    logs = [tmp_path / "resumed.log", tmp_path / "whole.log"]
    processes = [spawn(*args, "--out", tmp_path / "killed", "--resume", log=logs[0]),
                 spawn(*args, "--out", tmp_path / "whole", log=logs[1])]
    for process, log in zip(processes, logs):
        assert process.wait(timeout=300) == 0, tail(log)
    _, resumed = load_checkpoint(tmp_path / "killed")
    _, whole = load_checkpoint(tmp_path / "whole")
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
    assert not list((tmp_path / "killed").glob("*.tmp"))


def test_sigkill_during_export_leaves_no_bundle_and_the_next_export_cleans_up(workspace, tmp_path):
    ws = workspace
    assert invoke("train", "teachers", "--tasks", "polarity", "--out", tmp_path / "t", *common(ws), *FAST).exit_code == 0
    process = spawn("export", tmp_path / "t", "--out", tmp_path / "bundle", *common(ws), log=tmp_path / "export.log")
    wait_for(lambda: any(tmp_path.glob(".bundle.tmp-*")), process, tmp_path / "export.log")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "bundle").exists()
    assert invoke("export", tmp_path / "t", "--out", tmp_path / "bundle", *common(ws)).exit_code == 0
    assert (tmp_path / "bundle" / "manifest.json").is_file() and not list(tmp_path.glob(".bundle.tmp-*"))


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"stage": "x"}, {"a": torch.ones(3)}, step=1)

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"state-00000002.safetensors: No space left on device; the disk is full"):
        save_checkpoint(tmp_path, {"stage": "x"}, {"a": torch.zeros(3)}, step=2)
    monkeypatch.undo()
    index, tensors = load_checkpoint(tmp_path)
    assert index["step"] == 1 and torch.equal(tensors["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "state-00000001.safetensors"]


def test_a_read_only_output_folder_is_one_clear_error(workspace, tmp_path, monkeypatch):
    ws = workspace
    assert invoke("train", "teachers", "--tasks", "polarity", "--out", tmp_path / "t", *common(ws), *FAST).exit_code == 0
    real_write = Path.write_text

    def read_only(self, *args, **kwargs):
        if ".bundle.tmp-" in str(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    result = invoke("export", tmp_path / "t", "--out", tmp_path / "bundle", *common(ws))
    assert result.exit_code == 1 and "Read-only file system); free disk space or choose a writable --out" in result.output
    assert result.output.count("error:") == 1 and not (tmp_path / "bundle").exists()
    monkeypatch.undo()
    result = invoke("train", "teachers", "--tasks", "polarity", "--out", "/proc/mpt-edge-run", *common(ws), *FAST)
    assert result.exit_code == 1 and "error: cannot write /proc/mpt-edge-run: No such file or directory" in result.output
