"""Evaluation of a run: sliding-window loss, perplexity and bits per byte; last-word accuracy.

    python -m gptjax.eval --checkpoint RUN [--step N] [--data SOURCE] [--split S] [--stride S]
        [--batch-size B] [--max-tokens N] [--last-word FILE.jsonl] [--json]

Sliding windows: the token stream is cut into windows of context_length tokens whose starts are
`stride` apart; the first window scores all its tokens, every later one only its last `stride`
(the ones no window before it scored), and a last, shorter step is taken by a window that ends
at the stream's end. So every token but the first (which has nothing to be predicted from) is
scored exactly once, with at least context_length − stride tokens of left context once the first
window is behind. stride = context_length is the non-overlapping evaluation training reports.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes the scored tokens stand for:
each id's own byte string (one byte per byte-tokenizer id, a BPE token's bytes for gpt2);
end-of-text ids between documents count zero bytes, though their loss is counted. The bytes are
therefore those of the text as tokenized (invalid UTF-8 in a source already replaced by U+FFFD).
A source of prompt/completion records is scored on its completion tokens only (the loss weights
training uses), so loss and bytes are those of the completions.

Last-word accuracy (LAMBADA style): each line of a .jsonl file is {"context": ..., "target": ...};
an example is right when greedy decoding after the context yields exactly the target's tokens,
i.e. when every target token is the argmax given the context and the target tokens before it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gptjax import data, tokenizer
from gptjax.lora.runs import load_model
from gptjax.cli import OneLineParser, int_at_least, nonneg_int, positive_int, run_cli, user_path
from gptjax.config import Config, ModelConfig
from gptjax.errors import UserError
from gptjax.eval import scoring
from gptjax.eval.scoring import Windows, plan_windows


# --------------------------------------------------------------------------- windows


def _batches(tokens: np.ndarray, weights: np.ndarray | None, w: Windows, batch_size: int, T: int
             ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(windows in the batch, arrays [batch_size, T]); the last batch is padded with mask-0 rows
    so the scoring program compiles once. weights[i] weighs the prediction of token i."""
    L = w.length
    for b in range(0, len(w), batch_size):
        starts, froms = w.start[b : b + batch_size], w.score_from[b : b + batch_size]
        x = np.zeros((batch_size, T + 1), np.int32)
        mask = np.zeros((batch_size, T), np.float32)
        for r, (s, f) in enumerate(zip(starts, froms)):
            x[r, : L + 1] = tokens[s : s + L + 1]
            mask[r, f:L] = 1.0 if weights is None else weights[s + 1 + f : s + 1 + L]
        yield len(starts), {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": mask}


def token_bytes(tok: Any) -> np.ndarray:
    """UTF-8 bytes each token id stands for (end-of-text: 0), indexed by id."""
    if tok.name == "byte":
        out = np.ones(tok.vocab_size, np.int64)
    else:
        enc = getattr(tok, "_enc", None)  # tiktoken: a token's exact bytes, even a partial char
        one = enc.decode_single_token_bytes if enc is not None else (
            lambda i: tok.decode([i]).encode("utf-8"))
        out = np.array([len(one(i)) for i in range(tok.vocab_size)], np.int64)
    out[tok.eot_id] = 0
    return out


def score_tokens(params: Any, cfg: ModelConfig, tokens: np.ndarray, *, stride: int,
                 weights: np.ndarray | None = None, batch_size: int = scoring.DEFAULT_BATCH,
                 progress: bool = False) -> dict[str, Any]:
    """Sliding-window scoring of a token stream; `weights` (parallel to tokens, weight i for
    predicting token i) leaves out the tokens of weight 0, as training's loss does.

    Returns:
        {"loss" (nats/token), "perplexity", "tokens" (scored), "windows", "stride",
         "context_length"}.
    """
    T = cfg.context_length
    w = plan_windows(len(tokens), T, stride)
    total, count = 0.0, 0.0
    bar = scoring.progress_bar(len(w), "windows", progress)
    pending: list[Any] = []

    def drain() -> None:
        nonlocal total
        for logprob, _ in jax.device_get(pending):
            total -= float(logprob.sum())
        pending.clear()

    for n, batch in _batches(tokens, weights, w, batch_size, T):
        pending.append(scoring.continuation_logprob(params, batch["inputs"], batch["targets"],
                                                    batch["mask"], cfg))
        count += float(batch["mask"].sum())  # integer weights: exact in float32
        bar.update(n)
        if len(pending) >= 4:  # a few in flight: overlap the host's slicing with the device
            drain()
    drain()
    bar.close()
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count),
            "windows": len(w), "stride": stride, "context_length": T}


# --------------------------------------------------------------------------- last word


def read_last_word(path: str | Path) -> list[tuple[str, str]]:
    """(context, target) pairs of a .jsonl file, one object per non-blank line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {p}: {e}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise UserError(f"{p}:{i}: not valid JSON") from None
        if not (isinstance(rec, dict) and isinstance(rec.get("context"), str)
                and isinstance(rec.get("target"), str)):
            raise UserError(f'{p}:{i}: expected {{"context": string, "target": string}}')
        if not rec["context"] or not rec["target"].strip():
            raise UserError(f"{p}:{i}: empty context or target")
        out.append((rec["context"], rec["target"]))
    if not out:
        raise UserError(f"{p}: no examples")
    return out


def _split_example(tok: Any, context: str, target: str) -> tuple[list[int], list[int]]:
    # A space that ends the context belongs to the target's first word for BPE ("Ġword"),
    # so "the cat " + "sat" is scored as "the cat" + " sat".
    stripped = context.rstrip()
    if stripped and not target[:1].isspace():
        target, context = context[len(stripped):] + target, stripped
    return tok.encode(context), tok.encode(target)


def last_word_accuracy(params: Any, cfg: ModelConfig, tok: Any,
                       examples: Sequence[tuple[str, str]], *,
                       batch_size: int = scoring.DEFAULT_BATCH, progress: bool = False
                       ) -> dict[str, Any]:
    """Greedy last-word accuracy over (context, target) pairs.

    Returns:
        {"examples", "correct", "accuracy", "target_nll" (mean per example, nats),
         "target_perplexity" (exp of it), "truncated" (contexts cut to fit the window)}.
    """
    T = cfg.context_length
    pairs = [_split_example(tok, context, target) for context, target in examples]
    for _, tgt in pairs:
        if len(tgt) > T:
            raise UserError(f"a target of {len(tgt)} tokens does not fit the context of {T}")
    # A pair longer than the window keeps its end: the target and the context right before it.
    truncated = sum(len(ctx) + len(tgt) > T + 1 for ctx, tgt in pairs)
    scored = scoring.loglikelihoods(params, cfg, pairs, batch_size=batch_size,
                                    progress=progress)
    n = len(pairs)
    correct = sum(greedy for _, greedy in scored)
    mean_nll = -sum(logprob for logprob, _ in scored) / n
    return {"examples": n, "correct": correct, "accuracy": correct / n, "target_nll": mean_nll,
            "target_perplexity": math.exp(min(mean_nll, 700.0)), "truncated": truncated}


# --------------------------------------------------------------------------- data


def load_eval_tokens(cfg: Config, source: str | None, split: str | None,
                     text_key: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, str, str]:
    """(token stream, its loss weights or None, source, split) to score: the run's validation
    split by default; with `source`, the whole of a file/stdlib source ("all") or a split."""
    d = cfg.data
    if source is not None:
        d = dataclasses.replace(d, source=source)
    if text_key is not None:
        d = dataclasses.replace(d, text_key=text_key)
    tfds = d.source.strip().startswith("tfds:")
    split = split or ("all" if source is not None and not tfds else "validation")
    if split == "all":
        if tfds:
            raise UserError("--split all is for file and stdlib sources; use validation or train")
        # With nothing held out, a file source's "train" split is the whole source.
        d = dataclasses.replace(d, val_fraction=0.0)
    tokens, weights = data.load_split(dataclasses.replace(cfg, data=d),
                                      "train" if split == "all" else split)
    return tokens, weights, d.source, split


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m gptjax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", type=user_path)
    p.add_argument("--step", type=nonneg_int, help="checkpoint step (default: the latest)")
    p.add_argument("--data", metavar="SOURCE",
                   help="score this source instead of the run's (syntax of data.source)")
    p.add_argument("--split", choices=("validation", "train", "all"),
                   help="default: validation of the run's data; all of a --data file source")
    p.add_argument("--text-key", help="field holding the text in .jsonl sources (data.text_key)")
    p.add_argument("--stride", type=positive_int,
                   help="tokens between window starts, 1..context (default: context // 2)")
    p.add_argument("--batch-size", type=positive_int, default=scoring.DEFAULT_BATCH,
                   help="windows per call")
    p.add_argument("--max-tokens", type=int_at_least(2),
                   help="score only the first N tokens of the stream (at least 2)")
    p.add_argument("--last-word", metavar="FILE.jsonl", type=user_path,
                   help='last-word accuracy on {"context", "target"} lines; alone (without '
                        "--data) it skips the perplexity evaluation")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def run(a: argparse.Namespace) -> dict[str, Any]:
    examples = read_last_word(a.last_word) if a.last_word else None
    params, cfg, meta, step = load_model(a.checkpoint, a.step)
    tok_name = meta.get("tokenizer", cfg.data.tokenizer)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tok_name))
    m = cfg.model
    stride = a.stride if a.stride is not None else max(1, m.context_length // 2)
    if not 1 <= stride <= m.context_length:
        raise UserError(f"--stride must be in [1, {m.context_length}] (the context length), "
                        f"got {stride}")
    tok = tokenizer.get_tokenizer(tok_name)
    result: dict[str, Any] = {"checkpoint": str(a.checkpoint), "step": step, "tokenizer": tok_name}
    if examples is None or a.data is not None:
        tokens, weights, source, split = load_eval_tokens(cfg, a.data, a.split, a.text_key)
        if a.max_tokens is not None:
            tokens = tokens[: a.max_tokens]
            weights = None if weights is None else weights[: a.max_tokens]
        # The cache's shards as numpy arrays: the stream to score is read whole anyway.
        tokens = np.asarray(tokens)
        weights = None if weights is None else np.asarray(weights)
        table = token_bytes(tok)
        if int(tokens.max()) >= len(table):
            raise UserError(f"token id {int(tokens.max())} is outside the {tok_name} tokenizer")
        r = score_tokens(params, m, tokens, stride=stride, weights=weights,
                         batch_size=a.batch_size, progress=True)
        per_token = table[np.asarray(tokens[1:], np.int64)]
        if weights is not None:
            per_token = per_token * np.asarray(weights[1:], np.int64)
        n_bytes = int(per_token.sum())
        r.update(source=source, split=split, bytes=n_bytes,
                 bits_per_byte=r["loss"] * r["tokens"] / math.log(2) / max(n_bytes, 1))
        result["perplexity"] = r
    if examples is not None:
        result["last_word"] = {"file": str(a.last_word), **last_word_accuracy(
            params, m, tok, examples, batch_size=a.batch_size, progress=True)}
    return result


def report(result: dict[str, Any]) -> str:
    lines = [f"checkpoint {result['checkpoint']} (step {result['step']}, "
             f"{result['tokenizer']} tokenizer)"]
    r = result.get("perplexity")
    if r:
        lines.append(f"data {r['source']} ({r['split']}): {r['tokens']:,} tokens scored, "
                     f"{r['bytes']:,} bytes, {r['windows']:,} windows of {r['context_length']} "
                     f"at stride {r['stride']}")
        lines.append(f"loss {r['loss']:.4f} nats/token | perplexity {r['perplexity']:.3f} | "
                     f"{r['bits_per_byte']:.4f} bits/byte")
    w = result.get("last_word")
    if w:
        lines.append(f"last-word accuracy {w['accuracy']:.4f} ({w['correct']}/{w['examples']}) "
                     f"on {w['file']} | target perplexity {w['target_perplexity']:.3f}"
                     + (f" | {w['truncated']} contexts truncated" if w["truncated"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def body() -> None:
        result = run(a)
        print(json.dumps(result) if a.json else report(result), flush=True)

    return run_cli("gptjax.eval", body)

