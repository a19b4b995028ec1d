"""How far target adaptation moved each MPT run's prompt from the one it inherited (issue 12: why `factors` lags).

    python bench/prompt_motion.py bench/suites/transfer.toml --work builds/quality
    python bench/prompt_motion.py bench/suites/transfer.toml --work builds/quality --k 64 --seed 0

For every finished MPT run folder of a suite (each learning-rate grid entry), the dev-selected prompt against its
start, the shipped source's P* ∘ mean(U V): |P_k − P_0| / |P_0| for the composed prompt (l, d), and the same for
the factor product U V alone. A mode that moves its prompt far without reaching PT's accuracy is short of
directions, not of step size. Reads checkpoints only; trains nothing.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from mpt_edge.checkpoint import has_checkpoint
from mpt_edge.prompt import MultitaskPrompt
from mpt_edge.prompt_init import factors_from_source
from mpt_edge.shipped import resolve_source
from mpt_edge.trained import load_trained
from quality import read_suite


RUN_FOLDER = re.compile(r"(?P<target>.+)-k(?P<k>[^-]+)-s(?P<seed>\d+)-mpt-")   # as quality.py names run folders


def relative_move(now: torch.Tensor, start: torch.Tensor) -> float:
    return float((now - start).norm() / start.norm())


def product(prompt: MultitaskPrompt) -> torch.Tensor:
    """The first task's U V, (l, d)."""
    return (prompt.u[0] @ prompt.v[0]).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", type=Path)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "results" / "work" / "quality")
    parser.add_argument("--k", default=None, help="only this k")
    parser.add_argument("--seed", type=int, default=None, help="only this seed")
    args = parser.parse_args()
    suite = read_suite(args.suite)
    if not suite["shipped_source"]:
        raise SystemExit(f"error: {args.suite} trains its own source; this reads suites that start from a shipped one")
    source = resolve_source(suite["shipped_source"]).prompt.tensors()
    start = MultitaskPrompt(source["prompt.shared"][:1], *factors_from_source(source["prompt.u"], source["prompt.v"], 1),
                            [0])   # what a target starts from: P* and the mean of the source factors [paper]
    start_prompt, start_uv = start.fold()[0].detach(), product(start)
    print("| run | composed prompt moved | U V moved |\n| --- | --- | --- |")
    for folder in sorted((args.work / suite["name"] / "runs").glob("*-mpt-*")):
        run = RUN_FOLDER.match(folder.name)
        if run is None or not has_checkpoint(folder) or (args.seed is not None and int(run["seed"]) != args.seed) or \
                (args.k is not None and run["k"] != str(args.k)):
            continue
        prompt = load_trained(folder).prompt
        print(f"| {folder.name} | {relative_move(prompt.fold()[0].detach(), start_prompt):.2f} | "
              f"{relative_move(product(prompt), start_uv):.2f} |")


if __name__ == "__main__":
    main()
