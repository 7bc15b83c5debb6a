"""Figures for the closing note of issue 12: false alarms of the check table on correct backends.

1. N full CPU sessions of the clean backends (gloo, cpu_shm) through every suite: two world
   sizes (2, the bit-for-bit path; 3, the derived bound), every dtype, and each run its own
   hidden size and batch sizes (drawn from the run's number), so every run checks other
   inputs. A false alarm is any failed or errored test, any variant kept out of a config,
   or a non-zero exit status.
2. The derived bound for more than two ranks against every summation order a correct
   backend may use (sequential and pairwise in the dtype, float32 then one rounding), over
   many seeds, world sizes and dtypes, in this process: how many elements land outside.

    python benchmarks/clean_runs.py [--runs 20] [--bound-seeds 200]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pytest_allreduce.checks import sum_error_bound
from pytest_allreduce.jobs import mixed_input

DTYPES = ("bfloat16", "float16", "float32")
HIDDEN_CHOICES = (256, 512, 1024, 4096)


def session_args(run: int) -> list[str]:
    rng = random.Random(run)
    sizes = sorted({rng.randrange(1, 300) for _ in range(3)})
    return [
        "--pyargs",
        "pytest_allreduce.suites",
        "--allreduce-backends=gloo,cpu_shm",
        "--allreduce-world-sizes=2,3",
        f"--allreduce-dtypes={','.join(DTYPES)}",
        f"--allreduce-hidden-sizes={rng.choice(HIDDEN_CHOICES)}",
        f"--allreduce-batch-sizes={','.join(map(str, sizes))}",
        # No geometric tail past the drawn sizes: at world size 3 on two cores each tail size
        # costs tens of seconds, and many runs of other inputs find more than a few large ones.
        f"--allreduce-max-tokens={max(sizes)}",
        "--allreduce-output-dir=out",
    ]


def one_session(run: int) -> tuple[list[str], str, float]:
    """(false alarms, the plan, seconds) of one full session."""
    args = session_args(run)
    with tempfile.TemporaryDirectory(prefix="clean-run-") as directory:
        Path(directory, "pytest.ini").write_text("[pytest]\n")
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", *args],
            cwd=directory,
            capture_output=True,
            text=True,
            env=dict(os.environ),
        )
        seconds = time.monotonic() - start
    output = done.stdout + done.stderr
    alarms = re.findall(r"^(?:FAILED|ERROR) .*$", output, re.M)
    alarms += re.findall(r"^note: .* is kept out of the config: .*$", output, re.M)
    if done.returncode != 0 and not alarms:
        alarms.append(f"exit status {done.returncode}: {output[-2000:]}")
    plan = " ".join(a.removeprefix("--allreduce-") for a in args[5:7])
    counts = re.search(r"(\d+) passed", output)
    return alarms, f"{plan}; {counts.group(0) if counts else 'nothing passed'}", seconds


def summed(terms: list[torch.Tensor], order: str, dtype: torch.dtype) -> torch.Tensor:
    if order == "sequential in the dtype":
        acc = terms[0]
        for t in terms[1:]:
            acc = (acc.float() + t.float()).to(dtype)
        return acc
    if order == "pairwise in the dtype":
        level = list(terms)
        while len(level) > 1:
            paired = [
                (level[i].float() + level[i + 1].float()).to(dtype)
                for i in range(0, len(level) - 1, 2)
            ]
            level = paired + ([level[-1]] if len(level) % 2 else [])
        return level[0]
    acc = torch.zeros_like(terms[0], dtype=torch.float32)
    for t in reversed(terms):
        acc += t.float()
    return acc.to(dtype)


def bound_false_alarms(seeds: int) -> tuple[int, int]:
    """(elements outside `sum_error_bound`, elements checked) over correct orders."""
    outside = checked = 0
    cpu = torch.device("cpu")
    for seed in range(seeds):
        for name in DTYPES:
            dtype = getattr(torch, name)
            for ws in (3, 4, 8, 16):
                terms = [mixed_input(1000 + seed, r, 8, 512, dtype, cpu) for r in range(ws)]
                exact = sum(t.double() for t in terms)
                bound = sum_error_bound(sum(t.double().abs() for t in terms), ws, dtype)
                for order in ("sequential in the dtype", "pairwise in the dtype", "float32"):
                    error = (summed(terms, order, dtype).double() - exact).abs()
                    outside += int((error > bound).sum())
                    checked += error.numel()
    return outside, checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--bound-seeds", type=int, default=200)
    args = parser.parse_args()

    outside, checked = bound_false_alarms(args.bound_seeds)
    print(f"derived bound, correct orders: {outside} of {checked} elements outside")

    total_alarms = 0
    for run in range(args.runs):
        alarms, plan, seconds = one_session(run)
        total_alarms += len(alarms)
        print(f"run {run + 1:2d}/{args.runs}: {len(alarms)} false alarms, {seconds:.0f} s ({plan})")
        for alarm in alarms:
            print(f"    {alarm}")
        sys.stdout.flush()
    print(f"clean CPU sessions: {total_alarms} false alarms in {args.runs} runs")


if __name__ == "__main__":
    main()
