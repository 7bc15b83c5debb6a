"""Endpoint mode: GSM8K against running OpenAI-compatible servers (one per backend
configuration) through lm-eval's local-completions model, compared with the reference
endpoint question by question. Token identity does not apply: servers return text only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .compare import Comparison, compare_runs
from .gsm8k import run_gsm8k
from .records import GSM8KRun


class EndpointError(ValueError):
    """A bad endpoint list or reference, or a server that does not answer as expected."""


def parse_endpoints(text: str) -> dict[str, str]:
    """ "NAME=URL,NAME=URL" -> {NAME: URL}; URLs are full completions endpoints."""
    endpoints: dict[str, str] = {}
    for item in text.split(","):
        name, sep, url = item.strip().partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not name or not url:
            raise EndpointError(f"endpoint {item.strip()!r} is not NAME=URL")
        if not url.startswith(("http://", "https://")):
            raise EndpointError(f"endpoint {name}: {url!r} is not an http(s) URL")
        if name in endpoints:
            raise EndpointError(f"endpoint name {name!r} is given twice")
        endpoints[name] = url
    return endpoints


def served_model(url: str, timeout_s: float = 30.0) -> str:
    """The model a server serves, from the /models endpoint beside its completions URL
    (servers such as vLLM refuse requests that name another model)."""
    base, sep, _ = url.rstrip("/").rpartition("/completions")
    if not sep:
        raise EndpointError(f"{url} does not end in /completions; pass the model name")
    try:
        with urllib.request.urlopen(f"{base}/models", timeout=timeout_s) as reply:
            listing = json.load(reply)
        return str(listing["data"][0]["id"])
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
        raise EndpointError(f"{base}/models did not name a served model: {exc}") from exc


def run_endpoint(
    url: str,
    *,
    model: str | None,
    data_dir: Path | None,
    cache_dir: Path,
    limit: int | None,
    num_fewshot: int,
    max_gen_toks: int,
    concurrency: int = 64,
    timeout_s: int = 600,
) -> GSM8KRun:
    """GSM8K through one server: greedy, prompts sent as text (no tokenizer needed here)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        model=model or served_model(url),
        base_url=url,
        tokenizer_backend=None,
        num_concurrent=concurrency,
        max_retries=1,
        max_gen_toks=max_gen_toks,
        timeout=timeout_s,
    )
    return run_gsm8k(
        lm,
        data_dir=data_dir,
        cache_dir=cache_dir,
        limit=limit,
        num_fewshot=num_fewshot,
        max_gen_toks=max_gen_toks,
    )


@dataclass(frozen=True)
class EndpointResults:
    reference: str
    runs: dict[str, GSM8KRun]
    comparisons: dict[str, Comparison]  # every endpoint but the reference


def compare_endpoints(
    endpoints: dict[str, str],
    reference: str,
    *,
    model: str | None = None,
    data_dir: Path | None,
    cache_dir: Path,
    limit: int | None = None,
    num_fewshot: int = 5,
    max_gen_toks: int = 256,
    concurrency: int = 64,
    timeout_s: int = 600,
) -> EndpointResults:
    """Run every endpoint on the same questions and compare each with `reference`."""
    if reference not in endpoints:
        raise EndpointError(
            f"reference {reference!r} is not among the endpoints ({', '.join(endpoints)})"
        )
    if len(endpoints) < 2:
        raise EndpointError("endpoint mode needs the reference and at least one other endpoint")
    runs = {
        name: run_endpoint(
            url,
            model=model,
            data_dir=data_dir,
            cache_dir=cache_dir,
            limit=limit,
            num_fewshot=num_fewshot,
            max_gen_toks=max_gen_toks,
            concurrency=concurrency,
            timeout_s=timeout_s,
        )
        for name, url in endpoints.items()
    }
    others = [name for name in endpoints if name != reference]
    comparisons = {
        name: compare_runs(runs[reference], runs[name], comparisons=len(others)) for name in others
    }
    return EndpointResults(reference, runs, comparisons)
