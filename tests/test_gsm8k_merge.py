"""tools/gsm8k_merge.py: runs that split the backends merge only over an identical reference."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gsm8k_merge", REPO / "tools" / "gsm8k_merge.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


merge_tool = _tool()


def _run(folder: Path, answers: dict[str, list[str]], sha: str = "abc", gz: bool = False) -> Path:
    """A run's tp folder: summary and samples for `answers` (backend -> responses)."""
    folder.mkdir(parents=True)
    backends = {
        name: {"accuracy_strict": 0.5, "verdict": "passed", "questions_per_s": 10.0}
        for name in answers
    }
    summary = {"model": "m", "model_sha256": sha, "n": 2, "reference": "ref", "world_size": 2}
    (folder / "gsm8k-summary.json").write_text(json.dumps({**summary, "backends": backends}))
    lines = "".join(
        json.dumps({"backend": name, "doc_id": q, "response": text, "strict": True}) + "\n"
        for name, texts in answers.items()
        for q, text in enumerate(texts)
    )
    if gz:
        with gzip.open(folder / "gsm8k-samples.jsonl.gz", "wt") as f:
            f.write(lines)
    else:
        (folder / "gsm8k-samples.jsonl").write_text(lines)
    return folder


def test_runs_sharing_an_identical_reference_merge(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", {"ref": ["x", "y"], "one": ["x", "y"]})
    b = _run(tmp_path / "b", {"ref": ["x", "y"], "two": ["x", "z"]}, gz=True)
    log = tmp_path / "b.log"
    log.write_text(
        "allreduce: accuracy tp2 two: strict 0.5 (n=2), 3.0 q/s (prefill 1.5 s, 7 decode "
        "steps 0.5 s, wall 2.5 s), passed\n"
    )
    empty = tmp_path / "a.log"
    empty.write_text("")
    out = tmp_path / "merged.json"
    assert (
        merge_tool.main([str(a), str(b), "--log", str(empty), "--log", str(log), "--out", str(out)])
        == 0
    )
    merged = json.loads(out.read_text())
    assert set(merged["backends"]) == {"ref", "one", "two"}
    assert merged["backends"]["ref"]["runs"] == [0, 1]
    assert merged["backends"]["two"]["runs"] == [1]
    assert (
        merged["backends"]["two"]["prefill_s"] == 1.5 and merged["backends"]["two"]["wall_s"] == 2.5
    )
    assert "prefill_s" not in merged["backends"]["one"]


@pytest.mark.parametrize(
    ("second", "sha", "message"),
    [
        ({"ref": ["x", "changed"], "two": ["x", "y"]}, "abc", "answered 1 question"),
        ({"ref": ["x", "y"], "two": ["x", "y"]}, "other", "model_sha256"),
        ({"ref": ["x", "y"], "one": ["x", "y"]}, "abc", "one was already run"),
    ],
)
def test_runs_that_cannot_be_compared_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], second: dict, sha: str, message: str
) -> None:
    a = _run(tmp_path / "a", {"ref": ["x", "y"], "one": ["x", "y"]})
    b = _run(tmp_path / "b", second, sha=sha)
    out = tmp_path / "merged.json"
    assert merge_tool.main([str(a), str(b), "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()
