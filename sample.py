"""Samples text from a trained run, streaming it to stdout as it is decoded.

    python sample.py --checkpoint runs/default --prompt 'def ' [--max-new-tokens N --temperature T
        --top-k K --top-p P --seed S --num-samples N --greedy --step N --json]

Settings not given on the command line come from the run's `sample` config section;
--max-new-tokens may exceed the model's context (the window slides). Mistakes (missing
checkpoint, empty prompt or one longer than the context, bad settings) print one line and exit
with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gptjax import tokenizer
from gptjax.lora.runs import load_model
from gptjax.decode import generate
from gptjax.cli import OneLineParser, nonneg_int, run_cli, user_path
from gptjax.config import check_sampling
from gptjax.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", type=user_path,
                   help="a training run directory (holding checkpoints/)")
    p.add_argument("--step", type=nonneg_int, help="checkpoint step (default: the latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE", type=user_path,
                     help="read the prompt from a file (e.g. few-shot examples)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 is greedy")
    p.add_argument("--top-k", type=int, help="0 disables")
    p.add_argument("--top-p", type=float, help="nucleus mass in (0, 1]; 1 disables")
    p.add_argument("--seed", type=int, help="in [0, 2**32 - 1]")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def _check_args(a: argparse.Namespace) -> None:
    """Flags that are wrong whatever the checkpoint: fail before loading anything."""
    check_sampling({k: getattr(a, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                              "num_samples", "seed")},
                   lambda field: "--" + field.replace("_", "-"))


def read_prompt(a: argparse.Namespace) -> str:
    if a.prompt_file is not None:
        path = Path(a.prompt_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt-file {path}: {e}") from None
    else:
        text = a.prompt
    if not text:
        raise UserError("the prompt is empty")
    return text


def _safe_end(text: str) -> int:
    """Length of the part of `text` that more tokens cannot change: a trailing U+FFFD may be a
    character whose remaining bytes have not been sampled yet."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return end


def stream_text(chunks: Any, decode: Any, prompt: str, n: int) -> list[list[int]]:
    """Prints the samples one after another while the batch decodes: the sample on screen is live,
    later ones catch up when it ends. Returns every sample's tokens."""
    tokens: list[list[int]] = [[] for _ in range(n)]
    ended = [False] * n
    shown, printed = 0, 0  # the sample on screen, and how much of its text is out

    def out(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    def start(i: int) -> None:
        out((f"=== sample {i + 1}/{n} ===\n" if n > 1 else "") + prompt)

    start(0)
    for new in chunks:
        most = max(len(t) for t in new)
        for i, t in enumerate(new):
            tokens[i] += t
            # Rows step together, so a row that got fewer tokens than another has ended.
            ended[i] = ended[i] or len(t) < most
        while True:
            text = decode(tokens[shown])
            end = len(text) if ended[shown] else _safe_end(text)
            out(text[printed:end])
            printed = max(printed, end)
            if not ended[shown] or shown == n - 1:
                break
            out("\n")
            shown, printed = shown + 1, 0
            start(shown)
    # The stream is over: whatever is still open has ended too.
    for i in range(shown, n):
        if i > shown:
            start(i)
            printed = 0
        out(decode(tokens[i])[printed:] + "\n")
    return tokens


def run(a: argparse.Namespace) -> int:
    _check_args(a)
    prompt = read_prompt(a)
    params, cfg, meta, step = load_model(a.checkpoint, a.step)
    tok = tokenizer.get_tokenizer(meta.get("tokenizer", cfg.data.tokenizer))
    s = cfg.sample
    settings = {
        "max_new_tokens": a.max_new_tokens if a.max_new_tokens is not None else s.max_new_tokens,
        "temperature": 0.0 if a.greedy else (a.temperature if a.temperature is not None
                                             else s.temperature),
        "top_k": a.top_k if a.top_k is not None else s.top_k,
        "top_p": a.top_p if a.top_p is not None else s.top_p,
        "seed": a.seed if a.seed is not None else s.seed,
        "num_samples": a.num_samples,
    }
    ids = tok.encode(prompt)
    kw = dict(settings, eos_id=tok.eot_id)
    if a.json:
        samples = generate.generate(params, cfg.model, [ids], **kw)
    else:
        chunks = generate.generate_stream(params, cfg.model, [ids], **kw)
        samples = stream_text(chunks, tok.decode, prompt, a.num_samples)
    if a.json:
        record = {
            "checkpoint": str(a.checkpoint),
            "step": step,
            "tokenizer": tok.name,
            "prompt": prompt,
            "prompt_tokens": len(ids),
            "settings": settings,
            "samples": [
                {
                    "text": tok.decode(t),
                    "tokens": len(t),
                    # generate leaves end-of-text out, so a short sample is one that emitted it.
                    "finish_reason": "length" if len(t) == settings["max_new_tokens"]
                    else "end_of_text",
                }
                for t in samples
            ],
        }
        print(json.dumps(record, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return run_cli("sample.py", lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
