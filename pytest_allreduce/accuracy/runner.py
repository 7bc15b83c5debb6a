"""The accuracy suite's engine side: run GSM8K through each backend and judge it against the
reference, on the session's rank pools.

Every backend answers the same questions in the same batches as the reference (NCCL on
CUDA, gloo on the CPU; the reference run is made once per world size and kept). A backend
fails when:

- its ranks disagree (they must end with identical tokens: every rank runs the same model
  on the same reduced activations);
- at world size 2 an unfused backend's generations are not token-identical to the
  reference's: a correct allreduce of two values is the correctly rounded a + b whatever the
  algorithm, and the add + RMSNorm after it is the same code, so any difference is a bug;
- elsewhere (fused kernels, more ranks), at the first differing token one run's pick is not
  in the other's top 5: a near-tie may flip, a broken reduce picks tokens far outside it;
- McNemar's exact test says it answers fewer questions right beyond noise (one-sided
  p < 0.01 over the number of backends compared, and at least 2 points lost).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine import Engine
    from ..options import Options
    from ..registry import BackendRegistry, Variant
    from .compare import Comparison
    from .endpoints import EndpointResults
    from .records import GSM8KRun
    from .source import ModelSource

# Rows a backend without a size limit is set up for: more than any prompt's prefill.
UNBOUNDED_SETUP_ROWS = 8192
PREFILL_TOKENS = 2048  # prompt tokens packed into one prefill forward (rows of its reduces)
DECODE_BATCH = 128  # questions decoded together (rows of every decode reduce)
TOP_K = 5


class AccuracyUnavailable(Exception):
    """The suite cannot run here (an extra not installed, no data, no model): a skip."""


# Where lm-eval's own GSM8K dataset comes from when no data directory is given.
HUB = ("huggingface.co", 443)


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached from here, or None. Asked before lm-eval
    tries (and retries) to download its dataset, which takes tens of seconds to give up."""
    import socket

    try:
        socket.create_connection(HUB, timeout=timeout_s).close()
    except OSError as exc:
        return f"{HUB[0]} is not reachable ({exc.strerror or exc})"
    return None


def model_cache_dir() -> Path:
    """Where converted models live between sessions (a GGUF's float32 copy is large)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pytest-allreduce" / "models"


@dataclass
class BackendRun:
    """One backend's GSM8K run and the share of reduces it carried itself."""

    backend: str
    world_size: int
    run: GSM8KRun
    carried: float  # share of the row-parallel reduces the backend took (not its fallback)
    reduces: int
    engaged: str


@dataclass
class AccuracyVerdict:
    backend: str
    world_size: int
    reference: str
    result: BackendRun
    comparison: Comparison | None  # None for the reference itself
    exact_required: bool
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """Plain data for the evidence, the report and gsm8k-summary.json."""
        run = self.result.run
        out: dict[str, Any] = {
            "backend": self.backend,
            "world_size": self.world_size,
            "reference": self.reference,
            "n": run.n,
            "accuracy_strict": run.accuracy_strict,
            "accuracy_flexible": run.accuracy_flexible,
            "questions_per_s": run.questions_per_s,
            "seconds": run.seconds,
            "generation_s": run.generation_s,
            # Where generation time goes (rank 0, in-process runs): prompts vs decode steps.
            "prefill_s": sum(b.prefill_s for b in run.batches),
            "decode_s": sum(b.decode_s for b in run.batches),
            "decode_steps": sum(b.decode_steps for b in run.batches),
            "carried": self.result.carried,
            "reduces": self.result.reduces,
            "engaged": self.result.engaged,
            "exact_required": self.exact_required,
            "verdict": "passed" if self.passed else "failed",
            "problems": list(self.problems),
            # Answer for answer: what lm-eval scored, per question (gsm8k-samples.jsonl).
            "samples": [
                {
                    "doc_id": q.doc_id,
                    "strict": q.strict,
                    "flexible": q.flexible,
                    "response": q.response,
                }
                for q in run.questions
            ],
        }
        cmp = self.comparison
        if cmp is not None:
            first = cmp.first_divergence
            out.update(
                token_identical=cmp.token_identical,
                top_k_ok=cmp.top_k_ok,
                agreement=cmp.agreement,
                divergences=len(cmp.divergences),
                first_divergence=None
                if first is None
                else {
                    "question": first.doc_id,
                    "step": first.step,
                    "reference_token": first.reference_token,
                    "test_token": first.test_token,
                    "within_top_k": first.within_top_k,
                },
                mcnemar_p=min(v.p for v in cmp.mcnemar.values()),
                mcnemar={
                    metric: {"b": v.b, "c": v.c, "p": v.p, "alpha": v.alpha, "loss": v.loss}
                    for metric, v in cmp.mcnemar.items()
                },
                wilson={metric: [acc.low, acc.high] for metric, acc in cmp.test.items()},
            )
        return out


@dataclass(frozen=True)
class _Ranks:
    """The engine's pool of one world size, as the executor pool_generate runs on (a broken
    pool is replaced by the engine between calls)."""

    engine: Engine
    world_size: int

    def run(self, fn: Any, *args: Any) -> list[Any]:
        return self.engine.call(self.world_size, fn, *args)


class AccuracyRunner:
    """Per session: the model, the reference runs, and every backend's verdict."""

    def __init__(self, options: Options, engine: Engine, registry: BackendRegistry) -> None:
        self.options = options
        self.engine = engine
        self.registry = registry
        self.device = engine.plan.device
        self.dtype = "bfloat16" if self.device == "cuda" else "float32"
        self._source: ModelSource | None = None
        self._hidden: int | None = None
        self._runs: dict[tuple[str, int], BackendRun] = {}
        self._endpoints: EndpointResults | None = None
        self._unavailable: str | None = None  # once known, every later test skips at once
        self.verdicts: dict[tuple[str, int], AccuracyVerdict] = {}

    @property
    def reference(self) -> str:
        default = "nccl" if self.device == "cuda" else "gloo"
        return self.options.gsm8k_reference or default

    # ---- the model -----------------------------------------------------------------------

    def check_available(self) -> None:
        """Raise AccuracyUnavailable, at once, when the suite cannot run here."""
        if (
            self._unavailable is None
            and self.options.gsm8k_data is None
            and (why := hub_unreachable())
        ):
            self._unavailable = (
                f"no --allreduce-gsm8k-data given, and lm-eval's GSM8K dataset "
                f"(openai/gsm8k on the Hugging Face Hub) cannot be downloaded: {why}; pass "
                "a directory with GSM8K's train.jsonl and test.jsonl"
            )
        if self._unavailable is not None:
            raise AccuracyUnavailable(self._unavailable)
        self.source_extras()

    def source_extras(self) -> None:
        try:
            import lm_eval  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            raise AccuracyUnavailable(
                f"the accuracy suite needs the gsm8k extra ({exc.name} is not installed): "
                "pip install 'pytest-allreduce[gsm8k]'"
            ) from None

    def source(self) -> ModelSource:
        if self._source is None:
            self.source_extras()
            from .model_config import ModelConfig, ModelFormatError
            from .source import prepare_model_source
            from .tp_model import ShardingError

            try:
                self._source = prepare_model_source(self.options.model, model_cache_dir())
                self._hidden = ModelConfig.load(Path(self._source.path)).hidden_size
            except (ModelFormatError, ShardingError) as exc:
                raise AccuracyUnavailable(
                    f"--allreduce-model={self.options.model}: {exc}"
                ) from None
        return self._source

    def model_info(self) -> dict[str, Any]:
        """The model's identity for the artifacts."""
        source = self.source()
        return {
            "name": Path(source.name).name,
            "sha256": source.gguf_sha256,
            "fingerprint": source.fingerprint,
            "hidden": self.hidden,
            "dtype": self.dtype,
            "conversion_s": source.conversion_s,
        }

    @property
    def hidden(self) -> int:
        self.source()
        assert self._hidden is not None
        return self._hidden

    def work(self, variant: Variant, world_size: int) -> Any:
        from ..jobs import Work
        from ..model import Target

        target = Target(variant.name, world_size, self.hidden, self.dtype)
        largest = variant.limits(world_size).largest_rows(self.hidden, self.dtype)
        return Work(variant, target, largest if largest is not None else UNBOUNDED_SETUP_ROWS)

    # ---- runs ----------------------------------------------------------------------------

    def refusal(self, variant: Variant, world_size: int) -> str | None:
        """Why this variant cannot carry the model's reduces at all here, or None."""
        limits = variant.limits(world_size)
        if self.dtype not in limits.dtypes:
            return f"does not take {self.dtype} (the model's dtype here)"
        if self.hidden % limits.hidden_multiple:
            return (
                f"needs a hidden size multiple of {limits.hidden_multiple}, "
                f"the model has {self.hidden}"
            )
        return None

    def run(self, name: str, world_size: int) -> BackendRun:
        """GSM8K through backend `name` (kept: the reference is asked for by every test)."""
        key = (name, world_size)
        if key in self._runs:
            return self._runs[key]
        self.check_available()
        from .generate import GenerationOptions
        from .gsm8k import GSM8KUnavailable, PoolLM, pool_generate, run_gsm8k
        from .reducer import BackendReducerFactory

        variant = self.registry.variant(name)
        if variant is None:
            raise AccuracyUnavailable(f"no backend named {name!r}")
        source = self.source()
        fallback = None
        if name != self.reference:
            reference = self.registry.variant(self.reference)
            assert reference is not None
            fallback = self.work(reference, world_size)
        factory = BackendReducerFactory(self.work(variant, world_size), fallback)
        options = GenerationOptions(dtype=self.dtype, prefill_tokens=PREFILL_TOKENS, top_k=TOP_K)
        generate = pool_generate(_Ranks(self.engine, world_size), source, factory, options)
        lm = PoolLM(generate, batch_size=DECODE_BATCH)
        try:
            run = run_gsm8k(
                lm,
                data_dir=self.options.gsm8k_data,
                cache_dir=model_cache_dir().parent / "datasets",
                limit=self.options.gsm8k_limit,
                num_fewshot=self.options.gsm8k_fewshot,
            )
        except GSM8KUnavailable as exc:
            self._unavailable = str(exc)
            raise AccuracyUnavailable(str(exc)) from None
        carried, reduces = self._carried(variant, world_size, run)
        engaged = variant.spec.summary or name
        if carried < 1.0:
            engaged += f"; {self.reference} for the {1 - carried:.1%} of reduces it refuses"
        result = BackendRun(name, world_size, run, carried, reduces, engaged)
        self._runs[key] = result
        return result

    def _carried(self, variant: Variant, world_size: int, run: GSM8KRun) -> tuple[float, int]:
        """The share of reduces within the variant's limits (the rest went to the fallback),
        from the row counts every batch reported."""
        limits = variant.limits(world_size)
        setup_rows = self.work(variant, world_size).setup_rows
        total = own = 0
        for batch in run.batches:
            for rows, count in batch.reduce_rows.items():
                total += count
                refused = limits.shape_refusal(rows, self.hidden, self.dtype, world_size)
                if refused is None and rows <= setup_rows:
                    own += count
        return (own / total if total else 1.0), total

    # ---- verdicts ------------------------------------------------------------------------

    def judge(self, name: str, world_size: int, compared: int) -> AccuracyVerdict:
        """Run `name` and the reference; the verdict (kept for the artifacts)."""
        from .compare import compare_runs

        result = self.run(name, world_size)
        variant = self.registry.variant(name)
        assert variant is not None
        exact = world_size == 2 and not variant.fused
        verdict = AccuracyVerdict(name, world_size, self.reference, result, None, exact)
        run = result.run
        verdict.problems += [f"ranks disagree: {m}" for m in run.rank_mismatches[:5]]
        counts = {b.graph_buffers_registered for b in run.batches}
        if any(len(set(per_rank)) > 1 for per_rank in counts):
            verdict.problems.append(f"ranks registered different graph buffers: {sorted(counts)}")
        if name != self.reference:
            reference = self.run(self.reference, world_size)
            cmp = compare_runs(reference.run, run, comparisons=max(compared, 1), top_k=TOP_K)
            verdict.comparison = cmp
            first = cmp.first_divergence
            if exact and cmp.token_identical is False and first is not None:
                verdict.problems.append(
                    f"not token-identical to {self.reference} (required at world size 2 for an "
                    f"unfused allreduce): {len(cmp.divergences)} of {cmp.n} questions differ; "
                    f"first at question {first.doc_id}, step {first.step}: "
                    f"{self.reference} token {first.reference_token}, "
                    f"{name} token {first.test_token}"
                )
            if (bad := cmp.first_top_k_violation) is not None:
                verdict.problems.append(
                    f"question {bad.doc_id}, step {bad.step}: {name} picked token "
                    f"{bad.test_token} where {self.reference} picked {bad.reference_token}, "
                    f"and one is outside the other's top {TOP_K}"
                )
        self._mcnemar_problems(verdict)
        self.verdicts[(name, world_size)] = verdict
        return verdict

    def _mcnemar_problems(self, verdict: AccuracyVerdict) -> None:
        cmp = verdict.comparison
        if cmp is None:
            return
        for metric, mc in cmp.mcnemar.items():
            if mc.failed:
                verdict.problems.append(
                    f"{metric} accuracy {cmp.test[metric].value:.3f} against "
                    f"{cmp.reference[metric].value:.3f}: {mc.loss:.1%} lost, McNemar "
                    f"p={mc.p:.2g} < {mc.alpha:.2g} (b={mc.b}, c={mc.c})"
                )

    # ---- endpoint mode -------------------------------------------------------------------

    def judge_endpoint(self, name: str) -> AccuracyVerdict:
        """Endpoint mode: every endpoint answers the same questions (once, on first need);
        each is judged against the reference endpoint by McNemar (token identity and the
        top-k rule need token-level output, which the servers do not return)."""
        from .endpoints import compare_endpoints

        endpoints = dict(self.options.gsm8k_endpoints)
        reference = self.options.gsm8k_reference or next(iter(endpoints))
        if self._endpoints is None:
            self.source_extras()
            self._endpoints = compare_endpoints(
                endpoints,
                reference,
                data_dir=self.options.gsm8k_data,
                cache_dir=model_cache_dir().parent / "datasets",
                limit=self.options.gsm8k_limit,
                num_fewshot=self.options.gsm8k_fewshot,
            )
        run = self._endpoints.runs[name]
        result = BackendRun(name, 0, run, 1.0, 0, f"endpoint {endpoints[name]}")
        verdict = AccuracyVerdict(name, 0, reference, result, None, exact_required=False)
        verdict.comparison = self._endpoints.comparisons.get(name)
        self._mcnemar_problems(verdict)
        self.verdicts[(name, 0)] = verdict
        return verdict
