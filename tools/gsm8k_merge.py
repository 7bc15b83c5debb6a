"""One gsm8k-summary.json from accuracy-suite runs that split the backends between them.

A whole GSM8K run over every backend can outlast one bounded call on the GPU machine; the
backends are then run in groups, each group with the reference. The groups' results are
comparable only if the reference answered identically in every group, so that is checked
first, response for response, from each run's gsm8k-samples.jsonl:

    python tools/gsm8k_merge.py RUN_OUT_DIR RUN_OUT_DIR [...] --out SUMMARY.json
        [--model NAME] [--log RUN_LOG ...]

Each RUN_OUT_DIR holds one run's gsm8k-summary.json and gsm8k-samples.jsonl (the plugin's
tp{N} folder; the samples may be gzipped). Every run must name the same model checksum,
question count, world size and reference; a backend may appear in one run only (the
reference in all). With --log (one per
run, in the same order), the verdict lines' prefill / decode / wall seconds are added to
each backend. Exit status 1, with the reason, when the runs cannot be merged.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any

SAME = ("model_sha256", "n", "world_size", "reference")
# "allreduce: accuracy tp2 pynccl: ... 37.3 q/s (prefill 24.6 s, 2805 decode steps 10.7 s,
# wall 46.5 s), passed"
VERDICT_LINE = re.compile(
    r"accuracy tp\d+ (?P<backend>\S+): .*\(prefill (?P<prefill>[\d.]+) s, (?P<steps>\d+) "
    r"decode steps (?P<decode>[\d.]+) s, wall (?P<wall>[\d.]+) s\)"
)


class MergeError(Exception):
    pass


def _samples_file(run: Path) -> Path:
    """The run's gsm8k-samples.jsonl, or the same gzipped (as committed under docs/)."""
    for name in ("gsm8k-samples.jsonl", "gsm8k-samples.jsonl.gz"):
        if (run / name).is_file():
            return run / name
    raise MergeError(f"{run}: no gsm8k-samples.jsonl(.gz)")


def _responses(samples: Path, backend: str) -> dict[int, str]:
    found = {}
    opener = gzip.open if samples.suffix == ".gz" else open
    with opener(samples, "rt") as f:
        for line in f:
            record = json.loads(line)
            if record["backend"] == backend:
                found[record["doc_id"]] = record["response"]
    return found


def _times(log: Path) -> dict[str, dict[str, float]]:
    times = {}
    for match in VERDICT_LINE.finditer(log.read_text()):
        times[match["backend"]] = {
            "prefill_s": float(match["prefill"]),
            "decode_s": float(match["decode"]),
            "decode_steps": int(match["steps"]),
            "wall_s": float(match["wall"]),
        }
    return times


def merge(runs: list[Path], logs: list[Path], model: str | None) -> dict[str, Any]:
    summaries = []
    for run in runs:
        path = run / "gsm8k-summary.json"
        if not path.is_file():
            raise MergeError(f"{run}: no gsm8k-summary.json")
        summaries.append(json.loads(path.read_text()))
    first = summaries[0]
    for run, summary in zip(runs[1:], summaries[1:], strict=True):
        for key in SAME:
            if summary.get(key) != first.get(key):
                raise MergeError(
                    f"{run}: {key} is {summary.get(key)!r}, the first run's is {first.get(key)!r}"
                )
    reference = first["reference"]
    reference_answers = _responses(_samples_file(runs[0]), reference)
    if len(reference_answers) != first["n"]:
        raise MergeError(
            f"{runs[0]}: {len(reference_answers)} reference samples, n is {first['n']}"
        )
    for run in runs[1:]:
        answers = _responses(_samples_file(run), reference)
        differing = sorted(q for q in reference_answers if answers.get(q) != reference_answers[q])
        if differing or len(answers) != len(reference_answers):
            raise MergeError(
                f"{run}: the reference {reference} answered {len(differing)} question(s) "
                f"differently from {runs[0]} (first: {differing[:5]}): the runs cannot be compared"
            )
    backends: dict[str, Any] = {}
    times = [_times(log) for log in logs]
    for index, (run, summary) in enumerate(zip(runs, summaries, strict=True)):
        for name, result in summary["backends"].items():
            if name == reference and name in backends:
                backends[name]["runs"].append(index)
                continue
            if name in backends:
                raise MergeError(
                    f"{run}: {name} was already run in {runs[backends[name]['runs'][0]]}"
                )
            backends[name] = {**result, **(times[index].get(name, {}) if times else {})}
            backends[name]["runs"] = [index]
    return {
        "model": model or first.get("model"),
        "model_sha256": first["model_sha256"],
        "n": first["n"],
        "reference": reference,
        "world_size": first["world_size"],
        "runs": [
            {"source": str(run), "backends": sorted(s["backends"])}
            for run, s in zip(runs, summaries, strict=True)
        ],
        "reference_identical_across_runs": True,
        "backends": backends,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="each run's tp{N} output folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="the model's name for the summary")
    parser.add_argument("--log", action="append", type=Path, default=[], help="each run's log")
    args = parser.parse_args(argv)
    if args.log and len(args.log) != len(args.runs):
        parser.error(f"{len(args.log)} --log for {len(args.runs)} runs: give one per run or none")
    try:
        merged = merge(args.runs, args.log, args.model)
    except MergeError as exc:
        print(f"gsm8k_merge: {exc}", file=sys.stderr)
        return 1
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}: {len(merged['backends'])} backends from {len(args.runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
