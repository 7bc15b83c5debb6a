"""GSM8K exact match of a Hugging Face model directory under several prompt formats.

Runs the first N GSM8K test questions through one model under each prompt format, with greedy
decoding, and prints a Markdown table: strict and flexible exact match with Wilson 95%
intervals, the mean number of generated tokens and the seconds each format took, then a paired
comparison of every format with the first one on the same questions.

Formats:

- `plain-5shot`: lm-eval's gsm8k layout ("Question: {q}\\nAnswer: {a}" shots joined by a blank
  line, then "Question: {q}\\nAnswer:"), stop at "Question:", "</s>", "<|im_end|>" or EOS, at
  most 256 new tokens. The shots are the first 5 train examples, not lm-eval's seeded draw,
  so the prompts are not those of the lm-eval suite: same layout, fixed shots.
- `chat-0shot-cot`: the tokenizer's chat template with the user message "{q}\\nPlease reason
  step by step, and put your final answer within \\\\boxed{}." (Qwen's math prompt), at most
  512 new tokens, stop at EOS.
- `chat-5shot-multiturn`: the same 5 shots as user ("Question: {q}") and assistant (the full
  answer, "#### N" line included) turns, then the test question as the last user turn, at most
  256 new tokens, stop at EOS.

Scoring (every format): `strict` is lm-eval's strict-match, the number after "#### ", and for
`chat-0shot-cot` the first number inside the last \\boxed{...} when there is one; `flexible`
is lm-eval's flexible-extract, the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`. Both are
normalised (commas, "$" and a trailing "." removed) and compared as strings with the number
after "####" of the test answer.

Generation is greedy with a key/value cache: the token prefix all prompts of a format share
(the few-shot block, the system prompt) is computed once; rows are left-padded and a finished
row's slot is refilled with the next question, so a long answer does not hold a whole batch.

    python benchmarks/gsm8k_prompt_formats.py --model DIR [--data DIR] [--limit 100]
        [--formats plain-5shot,chat-0shot-cot,chat-5shot-multiturn] [--batch 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from pytest_allreduce.accuracy.stats import wilson_interval

NUM_SHOTS = 5
QWEN_MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval gsm8k strict-match
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval gsm8k flexible-extract
NUMBER_RE = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")
BOXED = "\\boxed{"
INVALID = "[invalid]"

Example = dict[str, str]
Messages = list[dict[str, str]]


# --- scoring ----------------------------------------------------------------------------------


def normalise(answer: str) -> str:
    """lm-eval's gsm8k normalisation: no commas, no "$", no trailing "."."""
    text = answer.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def gold_answer(answer: str) -> str:
    """The reference number of a GSM8K answer (what follows "####")."""
    return normalise(answer.split("####")[-1])


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text` (braces matched), or None."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def strict_answer(response: str, *, boxed: bool = False) -> str:
    """lm-eval's strict-match (first "#### N"); with `boxed`, the first number inside the last
    \\boxed{} wins when the response has one."""
    if boxed:
        content = last_boxed(response)
        if content is not None:
            number = NUMBER_RE.search(content.replace("\\$", "").replace("\\!", ""))
            return normalise(number.group(0)) if number else INVALID
    match = STRICT_RE.search(response)
    return normalise(match.group(1)) if match else INVALID


def flexible_answer(response: str) -> str:
    """lm-eval's flexible-extract: the last number-looking match of the response."""
    matches = FLEXIBLE_RE.findall(response)
    if not matches:
        return INVALID
    groups = [group for group in matches[-1] if group]
    return normalise(groups[0]) if groups else INVALID


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts."""
    from scipy.stats import binomtest

    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)


# --- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    name: str
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    boxed: bool  # score \boxed{} as the strict answer
    build: Callable[[Any, Sequence[Example], str], str]  # (tokenizer, shots, question) -> prompt


def plain_prompt(_tokenizer: Any, shots: Sequence[Example], question: str) -> str:
    blocks = [f"Question: {shot['question']}\nAnswer: {shot['answer']}" for shot in shots]
    blocks.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(blocks)


def chat(tokenizer: Any, messages: Messages) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def chat_cot_prompt(tokenizer: Any, _shots: Sequence[Example], question: str) -> str:
    return chat(tokenizer, [{"role": "user", "content": question + QWEN_MATH_INSTRUCTION}])


def chat_multiturn_prompt(tokenizer: Any, shots: Sequence[Example], question: str) -> str:
    messages: Messages = []
    for shot in shots:
        messages.append({"role": "user", "content": f"Question: {shot['question']}"})
        messages.append({"role": "assistant", "content": shot["answer"]})
    messages.append({"role": "user", "content": f"Question: {question}"})
    return chat(tokenizer, messages)


FORMATS = {
    f.name: f
    for f in (
        PromptFormat("plain-5shot", 256, ("Question:", "</s>", "<|im_end|>"), False, plain_prompt),
        PromptFormat("chat-0shot-cot", 512, ("<|im_end|>",), True, chat_cot_prompt),
        PromptFormat("chat-5shot-multiturn", 256, ("<|im_end|>",), False, chat_multiturn_prompt),
    )
}


# --- generation -------------------------------------------------------------------------------


@dataclass
class Generation:
    text: str
    new_tokens: int  # generated tokens, the one that ended generation included
    stop: str  # "eos", "stop-string" or "max-tokens"


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens all sequences share at their start, leaving every sequence at least one more."""
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    for i in range(max(limit, 0)):
        if any(s[i] != first[i] for s in sequences):
            return i
    return max(limit, 0)


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


KV = list[tuple[torch.Tensor, torch.Tensor]]


def cache_tensors(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class GreedyGenerator:
    """Greedy decoding of many prompts in a fixed number of slots, with a shared-prefix cache."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = {tokenizer.eos_token_id, model.config.eos_token_id, model.config.bos_token_id}
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                eos.add(token_id)
        self.eos_ids = {int(i) for i in eos if isinstance(i, int)}

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].argmax(-1)

    def _prefill(
        self, suffixes: Sequence[Sequence[int]], prefix: int, prefix_kv: KV
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cache, mask, next positions and first tokens of new rows after the shared prefix."""
        count, width = len(suffixes), max(len(s) for s in suffixes)
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + list(s) for s in suffixes])
        pad = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes])
        mask = torch.cat([torch.ones(count, prefix, dtype=torch.long), pad], 1)
        positions = prefix + (pad.cumsum(1) - 1).clamp(min=0)
        shared = [(k.expand(count, -1, -1, -1), v.expand(count, -1, -1, -1)) for k, v in prefix_kv]
        cache = DynamicCache(shared or None)
        first = self._forward(ids, mask, positions, cache)
        return cache, mask, positions[:, -1] + 1, first

    def _stop(
        self, generated: list[int], max_new_tokens: int, stop_strings: Sequence[str]
    ) -> str | None:
        if generated[-1] in self.eos_ids:
            return "eos"
        tail = self.tokenizer.decode(generated[-16:], skip_special_tokens=False)
        if any(s in tail for s in stop_strings):
            return "stop-string"
        return "max-tokens" if len(generated) >= max_new_tokens else None

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_strings: Sequence[str],
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        prefix = common_prefix_length(prompts)
        prefix_kv: KV = []
        if prefix > 0:
            cache = DynamicCache()
            ids = torch.tensor([list(prompts[0][:prefix])])
            self._forward(ids, torch.ones_like(ids), torch.arange(prefix)[None], cache)
            prefix_kv = cache_tensors(cache)

        results: list[Generation | None] = [None] * len(prompts)
        queue = list(range(len(prompts)))
        rows: list[int] = []  # prompt index per slot
        tokens: list[list[int]] = []  # generated tokens per slot
        cache = DynamicCache()
        mask = torch.zeros(0, 0, dtype=torch.long)  # over the cached columns, 0 for padding
        positions = torch.zeros(0, dtype=torch.long)  # position of each slot's next input
        last = torch.zeros(0, dtype=torch.long)  # each slot's newest token, not yet cached
        refill = max(1, self.batch_size // 4)

        while queue or rows:
            free = self.batch_size - len(rows)
            if queue and (free >= refill or not rows):
                admitted, queue = queue[:free], queue[free:]
                first_new = len(rows)
                new_cache, new_mask, new_pos, first = self._prefill(
                    [prompts[i][prefix:] for i in admitted], prefix, prefix_kv
                )
                if rows:
                    length = max(mask.shape[1], new_mask.shape[1])
                    cache = DynamicCache(
                        [
                            (
                                torch.cat([left_pad(k, length, 2), left_pad(nk, length, 2)]),
                                torch.cat([left_pad(v, length, 2), left_pad(nv, length, 2)]),
                            )
                            for (k, v), (nk, nv) in zip(
                                cache_tensors(cache), cache_tensors(new_cache), strict=True
                            )
                        ]
                    )
                    mask = torch.cat([left_pad(mask, length, 1), left_pad(new_mask, length, 1)])
                else:
                    cache, mask = new_cache, new_mask
                rows += admitted
                tokens += [[] for _ in admitted]
                positions = torch.cat([positions, new_pos])
                last = torch.cat([last, first])
            else:
                first_new = 0
                mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
                last = self._forward(last[:, None], mask, positions[:, None], cache)
                positions = positions + 1

            keep = list(range(first_new))
            for slot in range(first_new, len(rows)):
                token = int(last[slot])
                generated = tokens[slot]
                generated.append(token)
                stop = self._stop(generated, max_new_tokens, stop_strings)
                if stop is None:
                    keep.append(slot)
                    continue
                body = generated[:-1] if stop == "eos" else generated
                text = self.tokenizer.decode(body, skip_special_tokens=False)
                results[rows[slot]] = Generation(
                    truncate_at_stop(text, stop_strings), len(generated), stop
                )
                if progress is not None:
                    progress(1)
            if len(keep) < len(rows):
                index = torch.tensor(keep, dtype=torch.long)
                rows = [rows[i] for i in keep]
                tokens = [tokens[i] for i in keep]
                mask, positions, last = mask[index], positions[index], last[index]
                start = int(mask.any(0).nonzero()[0]) if rows else 0  # all-padding columns
                mask = mask[:, start:]
                cache = DynamicCache(
                    [(k[index, :, start:], v[index, :, start:]) for k, v in cache_tensors(cache)]
                    if rows
                    else None
                )
        return [r for r in results if r is not None]


# --- evaluation -------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[Example]:
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass
class FormatResult:
    name: str
    n: int
    strict: int
    flexible: int
    mean_new_tokens: float
    max_token_stops: int
    seconds: float
    prefix_tokens: int
    mean_prompt_tokens: float
    questions: list[dict[str, Any]]

    def figures(self) -> dict[str, Any]:
        strict_lo, strict_hi = wilson_interval(self.strict, self.n)
        flex_lo, flex_hi = wilson_interval(self.flexible, self.n)
        return {
            "format": self.name,
            "n": self.n,
            "strict": self.strict / self.n,
            "strict_correct": self.strict,
            "strict_wilson95": [strict_lo, strict_hi],
            "flexible": self.flexible / self.n,
            "flexible_correct": self.flexible,
            "flexible_wilson95": [flex_lo, flex_hi],
            "mean_new_tokens": self.mean_new_tokens,
            "max_token_stops": self.max_token_stops,
            "seconds": self.seconds,
            "shared_prefix_tokens": self.prefix_tokens,
            "mean_prompt_tokens": self.mean_prompt_tokens,
        }


def evaluate(
    generator: GreedyGenerator,
    fmt: PromptFormat,
    shots: Sequence[Example],
    tests: Sequence[Example],
) -> FormatResult:
    tokenizer = generator.tokenizer
    prompts = [fmt.build(tokenizer, shots, t["question"]) for t in tests]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    done = 0
    start = time.perf_counter()

    def progress(count: int) -> None:
        nonlocal done
        done += count
        if done % 10 == 0 or done == len(tests):
            elapsed = time.perf_counter() - start
            print(f"  {fmt.name}: {done}/{len(tests)} in {elapsed:.0f} s", file=sys.stderr)

    generations = generator.generate(ids, fmt.max_new_tokens, fmt.stop_strings, progress)
    seconds = time.perf_counter() - start
    questions = []
    for index, (test, generation) in enumerate(zip(tests, generations, strict=True)):
        gold = gold_answer(test["answer"])
        strict = strict_answer(generation.text, boxed=fmt.boxed)
        flexible = flexible_answer(generation.text)
        questions.append(
            {
                "index": index,
                "gold": gold,
                "strict_answer": strict,
                "flexible_answer": flexible,
                "strict_ok": strict == gold,
                "flexible_ok": flexible == gold,
                "new_tokens": generation.new_tokens,
                "stop": generation.stop,
                "response": generation.text,
            }
        )
    return FormatResult(
        name=fmt.name,
        n=len(tests),
        strict=sum(q["strict_ok"] for q in questions),
        flexible=sum(q["flexible_ok"] for q in questions),
        mean_new_tokens=sum(g.new_tokens for g in generations) / len(generations),
        max_token_stops=sum(g.stop == "max-tokens" for g in generations),
        seconds=seconds,
        prefix_tokens=common_prefix_length(ids),
        mean_prompt_tokens=sum(len(i) for i in ids) / len(ids),
        questions=questions,
    )


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_table(results: Sequence[FormatResult]) -> str:
    lines = [
        "| format | n | strict | strict 95% CI | flexible | flexible 95% CI "
        "| mean gen tokens | hit max tokens | seconds |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        s_lo, s_hi = wilson_interval(r.strict, r.n)
        f_lo, f_hi = wilson_interval(r.flexible, r.n)
        lines.append(
            f"| {r.name} | {r.n} | {percent(r.strict / r.n)} | {percent(s_lo)}–{percent(s_hi)} "
            f"| {percent(r.flexible / r.n)} | {percent(f_lo)}–{percent(f_hi)} "
            f"| {r.mean_new_tokens:.0f} | {r.max_token_stops} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def paired_table(results: Sequence[FormatResult]) -> str:
    """Each format against the first on the same questions (strict and flexible)."""
    base = results[0]
    lines = [
        f"| format vs {base.name} | metric | both right | only {base.name} | only format "
        "| exact McNemar p |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results[1:]:
        for metric in ("strict_ok", "flexible_ok"):
            pairs = [
                (a[metric], b[metric]) for a, b in zip(base.questions, r.questions, strict=True)
            ]
            both = sum(a and b for a, b in pairs)
            only_base = sum(a and not b for a, b in pairs)
            only_r = sum(b and not a for a, b in pairs)
            p = mcnemar_exact(only_base, only_r)
            lines.append(
                f"| {r.name} | {metric[:-3]} | {both} | {only_base} | {only_r} | {p:.3g} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument(
        "--data", type=Path, required=True, help="folder with GSM8K's train.jsonl and test.jsonl"
    )
    parser.add_argument("--limit", type=int, default=100, help="first N test questions")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="generation slots")
    parser.add_argument("--json", type=Path, help="write figures and responses here")
    args = parser.parse_args(argv)
    args.formats = [name.strip() for name in args.formats.split(",") if name.strip()]
    unknown = [name for name in args.formats if name not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; known: {', '.join(FORMATS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    train = read_jsonl(args.data / "train.jsonl")
    tests = read_jsonl(args.data / "test.jsonl")[: args.limit]
    shots = train[:NUM_SHOTS]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    generator = GreedyGenerator(model, tokenizer, args.batch)
    print(
        f"model {args.model}, {len(tests)} questions, batch {args.batch}, "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )

    results: list[FormatResult] = []
    wall = time.perf_counter()

    def write_json() -> None:
        if args.json is None:
            return
        payload = {
            "model": str(args.model),
            "data": str(args.data),
            "limit": args.limit,
            "batch": args.batch,
            "shots": f"first {NUM_SHOTS} train examples",
            "wall_seconds": time.perf_counter() - wall,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "threads": torch.get_num_threads(),
            "formats": {r.name: {**r.figures(), "questions": r.questions} for r in results},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")

    for name in args.formats:
        results.append(evaluate(generator, FORMATS[name], shots, tests))
        print(f"{name}: done in {results[-1].seconds:.0f} s", file=sys.stderr)
        write_json()  # after every format, so an interrupted run keeps what it finished

    print(f"all formats: {time.perf_counter() - wall:.0f} s", file=sys.stderr)
    print(markdown_table(results))
    if len(results) > 1:
        print()
        print(paired_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
