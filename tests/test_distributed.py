"""Data-parallel training under torchrun (2 gloo processes on CPU) against one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mpt_edge.checkpoint import load_checkpoint
from test_cli import FAST, common, invoke

SOURCE = ["--steps", "4", "--batch-size", "6", "--max-length", "32", "--rank", "2", "--quiet", "--checkpoint-every", "2"]


def torchrun(*args, procs: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               "-m", "mpt_edge", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this torch build")
def test_two_gloo_ranks_train_the_source_stage_like_one_process(workspace, tmp_path):
    ws = workspace
    result = invoke("train", "teachers", "--tasks", "polarity,topic,mood", "--out", tmp_path / "t", *common(ws), *FAST)
    assert result.exit_code == 0, result.output
    one = invoke("train", "source", "--teachers", tmp_path / "t", "--out", tmp_path / "one", *common(ws), *SOURCE)
    assert one.exit_code == 0, one.output
    two = torchrun("train", "source", "--teachers", tmp_path / "t", "--out", tmp_path / "two", *common(ws), *SOURCE)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("source: 4 steps") == 1          # rank 0 reports, rank 1 stays quiet
    index_one, single = load_checkpoint(tmp_path / "one")
    index_two, sharded = load_checkpoint(tmp_path / "two")
    # Same steps up to float summation order. Adafactor divides each update by its RMS, so a summation-order
    # difference becomes a fixed share of the step (~1e-4 here at the source's relative rate 0.4), which for an
    # entry near zero is far above 1e-4 of the entry: the tolerance is set against the tensor's scale. A rank
    # that skipped the gradient sum, or averaged it wrongly, misses by 1e-2 and more.
    for key in ("prompt.shared", "prompt.u", "prompt.v"):
        scale = single[key].abs().max().item()
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-4 * scale)
    for a, b in zip(index_one["history"], index_two["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)   # the logged loss is the global batch's


def test_batch_smaller_than_the_ranks_is_refused(workspace, tmp_path):
    ws = workspace
    result = invoke("train", "teachers", "--tasks", "polarity", "--out", tmp_path / "t", *common(ws), *FAST)
    assert result.exit_code == 0, result.output
    run = torchrun("train", "source", "--teachers", tmp_path / "t", "--out", tmp_path / "s", *common(ws),
                   "--steps", "2", "--batch-size", "1", "--quiet")
    assert run.returncode != 0 and "batch size 1 is smaller than the 2 ranks" in run.stderr
