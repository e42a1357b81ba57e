"""Batched scoring of a run for few-shot tasks, lm-evaluation-harness and last-word accuracy:
the log-likelihood of continuations given contexts, rolling (whole-document) log-likelihoods,
and text generation to stop strings; also the jitted scorer and the sliding windows that
gptjax.eval.perplexity scores a token stream with.

Requests are sorted by length and padded to power-of-two lengths (buckets); each bucket's calls
have one shape, so the jitted forward pass compiles once per bucket. A call holds about
`batch_size` × context_length tokens: many rows of a short bucket, few of a long one.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gptjax.decode import generate
from gptjax.config import ModelConfig
from gptjax.errors import UserError
from gptjax.model.losses import token_nll
from gptjax.model import GPT, variables

DEFAULT_BATCH = 8  # rows of a full-context call; shorter buckets take proportionally more
MIN_BUCKET = 16
Pair = tuple[Sequence[int], Sequence[int]]  # (context token ids, continuation token ids)


@functools.partial(jax.jit, static_argnames="cfg")
def continuation_logprob(params: Any, inputs_BL: jax.Array, targets_BL: jax.Array,
                         mask_BL: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Per row: the summed log-probability of the targets weighted by mask, and whether every
    masked target is the argmax (what greedy decoding would have produced)."""
    logits = GPT(cfg).apply(variables(params), inputs_BL)
    nll = token_nll(logits, targets_BL)
    hit = (jnp.argmax(logits, -1) == targets_BL) | (mask_BL == 0)
    return -(nll * mask_BL).sum(-1), hit.all(-1)


def bucket_length(n: int, context_length: int) -> int:
    """The padded length of an input of n tokens: a power of two, at least MIN_BUCKET, at most
    the context."""
    return min(context_length, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


def progress_bar(total: int, unit: str, enabled: bool) -> Any:
    """A tqdm bar on stderr, or a silent one when not enabled."""
    # disable=None: tqdm draws only when stderr is a terminal.
    return tqdm(total=total, unit=f" {unit}", file=sys.stderr, disable=None if enabled else True,
                dynamic_ncols=True, leave=False)


def _rows(pairs: Sequence[Pair], T: int) -> list[tuple[list[int], int]]:
    """(input + target ids, continuation length) per pair; a sequence longer than the context
    keeps its end (the continuation and the context right before it), as lm-eval does."""
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise UserError(f"request {i}: empty continuation")
        if len(cont) > T:
            raise UserError(f"request {i}: a continuation of {len(cont)} tokens does not fit "
                            f"the model's context of {T}")
        if not ctx:
            raise UserError(f"request {i}: empty context (give at least one token, e.g. "
                            "end-of-text)")
        ids = [*ctx, *cont][-(T + 1):]
        rows.append((ids, len(cont)))
    return rows


def loglikelihoods(params: Any, cfg: ModelConfig, pairs: Sequence[Pair], *,
                   batch_size: int = DEFAULT_BATCH, progress: bool = False
                   ) -> list[tuple[float, bool]]:
    """log P(continuation | context) and whether greedy decoding yields the continuation, per
    (context ids, continuation ids) pair, in the order given.

    Args:
      params: the model's parameters.
      cfg: the model's config.
      pairs: contexts of at least one token (use end-of-text for none) and nonempty
        continuations; a pair longer than context_length + 1 keeps its last tokens.
      batch_size: rows per call at full context length.
      progress: a tqdm bar on stderr (only on a terminal).
    Returns:
      [(log-probability in nats, is_greedy)] parallel to pairs.
    """
    T = cfg.context_length
    rows = _rows(pairs, T)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    bar = progress_bar(len(rows), "requests", progress)
    pending: list[tuple[list[int], Any]] = []

    def drain() -> None:
        for idx, res in zip([p[0] for p in pending], jax.device_get([p[1] for p in pending])):
            for r, lp, greedy in zip(idx, *res):
                out[r] = (float(lp), bool(greedy))
        pending.clear()

    i = 0
    while i < len(order):
        L = bucket_length(len(rows[order[i]][0]) - 1, T)
        n_rows = max(1, batch_size * T // L)
        chunk = order[i : i + n_rows]
        chunk = [r for r in chunk if bucket_length(len(rows[r][0]) - 1, T) == L]
        x = np.zeros((n_rows, L + 1), np.int32)
        mask = np.zeros((n_rows, L), np.float32)
        for j, r in enumerate(chunk):
            ids, n_cont = rows[r]
            x[j, : len(ids)] = ids
            mask[j, len(ids) - 1 - n_cont : len(ids) - 1] = 1.0
        res = continuation_logprob(params, x[:, :-1], x[:, 1:], mask, cfg)
        pending.append((chunk, res))
        if len(pending) >= 4:  # a few calls in flight: host-side packing overlaps the device
            drain()
        i += len(chunk)
        bar.update(len(chunk))
    drain()
    bar.close()
    return out


@dataclasses.dataclass(frozen=True)
class Windows:
    """Sliding windows over a stream of n tokens; window w reads inputs tokens[start[w] :
    start[w] + length] and scores its positions score_from[w] .. length − 1."""

    start: np.ndarray
    score_from: np.ndarray
    length: int

    def __len__(self) -> int:
        return len(self.start)


def plan_windows(n_tokens: int, context_length: int, stride: int) -> Windows:
    """The windows that score each of the n_tokens − 1 targets once, at least context_length −
    stride tokens of left context after the first (gptjax.eval.perplexity's sliding scheme)."""
    if not 1 <= stride <= context_length:
        raise UserError(f"--stride must be in [1, {context_length}] (the context length), "
                        f"got {stride}")
    n_targets = n_tokens - 1
    if n_targets <= 0:
        raise UserError(f"{n_tokens} token(s) are too few to score: at least 2 are needed")
    T = min(context_length, n_targets)
    k = np.arange(1, -(-(n_targets - T) // stride) + 1, dtype=np.int64)
    ends = np.minimum(T + k * stride, n_targets)
    starts = ends - T
    scored_before = T + (k - 1) * stride  # targets [0, scored_before) belong to earlier windows
    return Windows(
        start=np.concatenate([[0], starts]).astype(np.int64),
        score_from=np.concatenate([[0], scored_before - starts]).astype(np.int64),
        length=T,
    )


def rolling_pairs(tokens: Sequence[int], prefix_id: int, context_length: int) -> list[Pair]:
    """A document as (context, continuation) pairs that score each of its tokens once: the
    first from `prefix_id` alone, each with as much left context as plan_windows gives at
    stride = context length (lm-eval's rolling scheme: disjoint windows, the last one full)."""
    stream = [prefix_id, *tokens]
    if len(stream) < 2:
        return []
    w = plan_windows(len(stream), context_length, context_length)
    pairs = []
    for s, f in zip(w.start.tolist(), w.score_from.tolist()):
        seq = stream[s : s + w.length + 1]
        pairs.append((seq[: f + 1], seq[f + 1:]))
    return pairs


def rolling_loglikelihoods(params: Any, cfg: ModelConfig, docs: Sequence[Sequence[int]],
                           prefix_id: int, *, batch_size: int = DEFAULT_BATCH,
                           progress: bool = False) -> list[float]:
    """log P(document) per token list, each token predicted once (see rolling_pairs)."""
    owner, pairs = [], []
    for d, toks in enumerate(docs):
        for p in rolling_pairs(toks, prefix_id, cfg.context_length):
            owner.append(d)
            pairs.append(p)
    totals = [0.0] * len(docs)
    for d, (lp, _) in zip(owner, loglikelihoods(params, cfg, pairs, batch_size=batch_size,
                                                progress=progress)):
        totals[d] += lp
    return totals


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """text up to (not including) the first occurrence of any stop string."""
    end = len(text)
    for s in stops:
        if s and (k := text.find(s)) != -1:
            end = min(end, k)
    return text[:end]


def generate_texts(params: Any, cfg: ModelConfig, tok: Any, prompts: Sequence[Sequence[int]],
                   *, max_new_tokens: int, stops: Sequence[str] = (), temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = DEFAULT_BATCH, truncate_prompt: bool = False,
                   progress: bool = False) -> list[str]:
    """Generated text per token prompt, cut before the first stop string; greedy at temperature
    0. Decoding ends at end-of-text or at a stop string's tokens (the text is also cut where a
    stop string appears across token boundaries). Prompts are decoded batch_size at a time in
    order of length; each row's random stream depends on seed alone (see generate.generate).

    max_new_tokens is cut to what the context leaves after the longest prompt of a batch when
    truncate_prompt is set; otherwise a prompt that leaves no room raises UserError."""
    stop_ids = [tok.encode(s) for s in stops if s]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    bar = progress_bar(len(prompts), "prompts", progress)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        new = generate.generate(params, cfg, [prompts[i] for i in idx],
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, eos_id=tok.eot_id,
                                stop_sequences=stop_ids, truncate_prompt=truncate_prompt)
        texts = [cut_at_stop(tok.decode(ids), stops) for ids in new]
        for i, t in zip(idx, texts):
            out[i] = t
        bar.update(len(idx))
    bar.close()
    return out
