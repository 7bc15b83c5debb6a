"""Do repeated runs of the main job write the same config? (issue 13, item 4)

Runs the README's main command N times back to back, each into its own output folder (or
reads the output folders of runs made before), then for every pair of runs reports

- whether the configs are identical, how many keys either has that the other lacks, and
  for how many token counts from 1 to the largest key the two route to different backends
  (what a server would notice);
- the run-to-run drift of the backends' ratios (`benchmarks/drift.py`): the common shift,
  which `noise.DRIFT_FLOOR` states, and the independent change of one size.

    python benchmarks/config_repeat.py --runs 4 [--work DIR] [-- EXTRA PYTEST ARGS]
    python benchmarks/config_repeat.py --existing OUT_DIR OUT_DIR [...]

Every run's config name is taken from its tp2 folder (the config without `tp=` in its name).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from drift import drift, load, medians

from pytest_allreduce.config import load_config
from pytest_allreduce.consumer import profile_for
from pytest_allreduce.serving import runnable_variants


def run_main_job(out: Path, extra: list[str]) -> float:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "pytest_allreduce.suites", "-q",
         "-p", "no:cacheprovider", f"--allreduce-output-dir={out}", *extra],
        capture_output=True, text=True, cwd=out.parent,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(f"main job into {out} exited {done.returncode}:\n{done.stdout[-3000:]}")
    return time.monotonic() - began


def _files(out: Path) -> tuple[Path, Path]:
    configs = [p for p in (out / "tp2").glob("allreduce_config_*.json") if ",tp=" not in p.name]
    evidence = list((out / "tp2").glob("allreduce_evidence_*.json"))
    if len(configs) != 1 or len(evidence) != 1:
        raise SystemExit(f"{out}/tp2: expected one config and one evidence file")
    return configs[0], evidence[0]


def compare(a: Path, b: Path) -> dict[str, Any]:
    (config_a, evidence_a), (config_b, evidence_b) = _files(a), _files(b)
    ca, cb = load_config(config_a), load_config(config_b)
    keys_a, keys_b = set(ca.batch_sizes), set(cb.batch_sizes)
    largest = max(keys_a | keys_b)
    routed_apart = sum(
        ca.lookup(n).backend_name != cb.lookup(n).backend_name for n in range(1, largest + 1)
    )
    doc_a, doc_b = load(evidence_a), load(evidence_b)
    profile = profile_for(doc_a["device"])
    variants = set().union(*(runnable_variants(profile, e) for e in profile.entries))
    common, spread, _ = drift(medians(doc_a, "bfloat16"), medians(doc_b, "bfloat16"), variants)
    return {
        "identical": config_a.read_text() == config_b.read_text(),
        "keys_only_in_one": len(keys_a ^ keys_b),
        "keys": [len(keys_a), len(keys_b)],
        "token_counts_routed_apart": routed_apart,
        "up_to": largest,
        "drift_common": round(common, 4),
        "drift_independent": round(spread, 4),
    }


def _label(out: Path) -> str:
    return "/".join(out.parts[-2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--work", type=Path, help="where the runs' output folders go")
    parser.add_argument("--existing", type=Path, nargs="+", help="compare these output folders")
    parser.add_argument("--json", type=Path, help="write the comparison here too")
    parser.add_argument("extra", nargs="*", help="more pytest arguments for each run")
    args = parser.parse_args(argv)
    walls: list[float] = []
    if args.existing:
        outs = args.existing
    else:
        if args.runs < 2:
            parser.error("--runs must be at least 2")
        work = args.work or Path(tempfile.mkdtemp(prefix="config-repeat-"))
        work.mkdir(parents=True, exist_ok=True)
        outs = [work / f"run{i + 1}" for i in range(args.runs)]
        for out in outs:
            walls.append(run_main_job(out, args.extra))
            print(f"{out}: {walls[-1]:.1f} s", flush=True)
    pairs = {}
    for a, b in itertools.combinations(outs, 2):
        result = compare(a, b)
        label = f"{_label(a)} vs {_label(b)}"
        pairs[label] = result
        print(f"{label}: {json.dumps(result)}")
    same = sum(r["identical"] for r in pairs.values())
    print(
        f"{same} of {len(pairs)} pairs wrote identical configs; keys in one config only: "
        f"{[r['keys_only_in_one'] for r in pairs.values()]}; largest common drift "
        f"{max(r['drift_common'] for r in pairs.values()):.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"walls_s": walls, "pairs": pairs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
