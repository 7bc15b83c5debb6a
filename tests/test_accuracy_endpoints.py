"""Endpoint mode against mock OpenAI-compatible servers on loopback: lm-eval's
local-completions drives each, and the runs are compared with the reference's."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("aiohttp")
pytest.importorskip("tenacity")

from pytest_allreduce.accuracy.endpoints import (
    EndpointError,
    compare_endpoints,
    parse_endpoints,
    served_model,
)

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(
    not (GSM8K / "test.jsonl").is_file(), reason=f"GSM8K data not found at {GSM8K}"
)
SERVED = "mock-served-model"


class MockServer:
    """An OpenAI-compatible completions server answering with `reply(question)`."""

    def __init__(self, reply: Callable[[str], str]) -> None:
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest's output clean
                pass

            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send({"object": "list", "data": [{"id": SERVED, "object": "model"}]})
                else:
                    self.send_error(404)

            def do_POST(self) -> None:
                if self.path != "/v1/completions":
                    self.send_error(404)
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
                choices = []
                for i, prompt in enumerate(prompts):
                    question = prompt.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
                    choices.append({"index": i, "text": reply(question), "finish_reason": "stop"})
                self._send(
                    {"object": "text_completion", "model": body["model"], "choices": choices}
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/completions"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def servers() -> Iterator[Callable[[Callable[[str], str]], MockServer]]:
    started: list[MockServer] = []

    def start(reply: Callable[[str], str]) -> MockServer:
        started.append(MockServer(reply))
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_parse_endpoints() -> None:
    assert parse_endpoints(
        "nccl=http://127.0.0.1:1/v1/completions, ar=https://h/v1/completions"
    ) == {
        "nccl": "http://127.0.0.1:1/v1/completions",
        "ar": "https://h/v1/completions",
    }
    for bad, message in [
        ("nccl", "not NAME=URL"),
        ("=http://x", "not NAME=URL"),
        ("a=ftp://x", "not an http"),
        ("a=http://x,a=http://y", "given twice"),
    ]:
        with pytest.raises(EndpointError, match=message):
            parse_endpoints(bad)


def test_served_model_is_asked_of_the_server(servers: Callable) -> None:
    server = servers(str)
    assert served_model(server.url) == SERVED
    with pytest.raises(EndpointError, match="does not end in /completions"):
        served_model(server.url.removesuffix("/completions"))


@needs_gsm8k
def test_endpoints_are_compared_with_the_reference(servers: Callable, tmp_path: Path) -> None:
    answers = {
        json.loads(line)["question"]: json.loads(line)["answer"]
        for line in (GSM8K / "test.jsonl").read_text().splitlines()[:10]
    }
    wrong = set(list(answers)[:8])
    reference = servers(lambda q: " " + answers[q])
    same = servers(lambda q: " " + answers[q])
    lossy = servers(lambda q: " It is #### 0" if q in wrong else " " + answers[q])
    endpoints = {"nccl": reference.url, "custom": same.url, "broken": lossy.url}

    results = compare_endpoints(
        endpoints, "nccl", data_dir=GSM8K, cache_dir=tmp_path, limit=10, num_fewshot=2
    )

    assert results.runs["nccl"].accuracy_strict == 1.0
    assert results.runs["broken"].accuracy_flexible == pytest.approx(0.2)
    good, bad = results.comparisons["custom"], results.comparisons["broken"]
    assert good.token_identical is None and good.agreement == 1.0
    assert not good.mcnemar["flexible"].failed
    strict = bad.mcnemar["strict"]
    # 8 of 8 discordant questions lost: p = 1/256, below 0.01 / 2 endpoints; 80 points lost.
    assert (strict.b, strict.c, strict.p) == (8, 0, pytest.approx(1 / 256))
    assert strict.alpha == pytest.approx(0.005) and strict.failed
    assert bad.agreement == pytest.approx(0.2)
    # Greedy, the served model's name, lm-eval's stop strings, the question in the prompt.
    body = reference.requests[0]
    assert body["model"] == SERVED and body["temperature"] == 0
    assert "Question:" in body["stop"]
    assert sum(len(s.requests) for s in (reference, same, lossy)) == 30


def test_reference_must_be_an_endpoint(tmp_path: Path) -> None:
    with pytest.raises(EndpointError, match="reference 'nccl' is not among"):
        compare_endpoints(
            {"a": "http://127.0.0.1:9/v1/completions"}, "nccl", data_dir=None, cache_dir=tmp_path
        )
