"""The accuracy suite's artifacts: `tp{N}/gsm8k-summary.json`, `tp{N}/gsm8k-report.md` and
`tp{N}/gsm8k-samples.jsonl` (every backend's scored response to every question).

The summary holds, per backend, the figures a server operator asks for (strict and flexible
accuracy, token identity with the reference, McNemar's p, the verdict) beside the model's
identity, so a run on one machine can be compared with another's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

SUMMARY_NAME = "gsm8k-summary.json"
REPORT_NAME = "gsm8k-report.md"
SAMPLES_NAME = "gsm8k-samples.jsonl"


def summary(results: Mapping[str, dict[str, Any]], model: Mapping[str, Any]) -> dict[str, Any]:
    """`results`: backend -> the runner's per-backend summary (one world size)."""
    first = next(iter(results.values()))
    return {
        "model": model.get("name"),
        "model_sha256": model.get("sha256"),
        "n": first["n"],
        "reference": first["reference"],
        "world_size": first["world_size"],
        "backends": {
            name: {
                "accuracy_strict": r["accuracy_strict"],
                "accuracy_flexible": r["accuracy_flexible"],
                "token_identical": r.get("token_identical"),
                "mcnemar_p": r.get("mcnemar_p"),
                "verdict": r["verdict"],
                "agreement": r.get("agreement"),
                "first_divergence": r.get("first_divergence"),
                "carried": r["carried"],
                "questions_per_s": r["questions_per_s"],
                # Seconds: generation (prefill + decode, rank 0) and the run's wall time.
                "generation_s": r.get("generation_s"),
                "prefill_s": r.get("prefill_s"),
                "decode_s": r.get("decode_s"),
                "wall_s": r.get("seconds"),
                "problems": r["problems"],
            }
            for name, r in results.items()
        },
    }


def samples(results: Mapping[str, dict[str, Any]]) -> str:
    """One JSON line per backend and question: what lm-eval scored and how."""
    lines = [
        json.dumps({"backend": name, **sample}, sort_keys=True)
        for name, r in results.items()
        for sample in r.get("samples", ())
    ]
    return "".join(line + "\n" for line in lines)


def table(results: Mapping[str, dict[str, Any]]) -> list[str]:
    """The accuracy table, as Markdown lines (also embedded in the latency report)."""
    lines = [
        "| backend | strict (95% CI) | flexible (95% CI) | token-identical | agreement "
        "| first divergence | McNemar p | carried | q/s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        wilson = r.get("wilson") or {}

        def acc(metric: str, r: dict[str, Any] = r, wilson: dict[str, Any] = wilson) -> str:
            value = r[f"accuracy_{metric}"]
            if metric in wilson:
                low, high = wilson[metric]
                return f"{value:.3f} ({low:.3f}-{high:.3f})"
            return f"{value:.3f}"

        first = r.get("first_divergence")
        where = "-" if not first else f"q{first['question']} step {first['step']}"
        identical = {True: "yes", False: "no", None: "-"}[r.get("token_identical")]
        agreement = "-" if r.get("agreement") is None else f"{r['agreement']:.1%}"
        p = "-" if r.get("mcnemar_p") is None else f"{r['mcnemar_p']:.3g}"
        verdict = r["verdict"]
        if r["problems"]:
            verdict += ": " + "; ".join(r["problems"]).replace("|", "\\|")
        lines.append(
            f"| {name} | {acc('strict')} | {acc('flexible')} | {identical} | {agreement} "
            f"| {where} | {p} | {r['carried']:.1%} | {r['questions_per_s']:.1f} | {verdict} |"
        )
    return lines


def report(results: Mapping[str, dict[str, Any]], model: Mapping[str, Any]) -> str:
    first = next(iter(results.values()))
    lines = [
        f"# GSM8K accuracy per backend: tp{first['world_size']}",
        "",
        f"- Model: {model.get('name')} (sha256 {model.get('sha256') or '-'})",
        f"- Questions: {first['n']}; reference: `{first['reference']}`",
        "- Rules: at world size 2 an unfused backend must be token-identical to the "
        "reference; at the first differing token each run's pick must be in the other's "
        "top 5; McNemar's exact test (one-sided, Bonferroni over the backends) fails a "
        "backend losing at least 2 points with p < 0.01/k",
        "",
        *table(results),
    ]
    return "\n".join(lines) + "\n"
