"""GPT-3's optimizer (Appendix B): global-norm clipping, AdamW with a decay mask, linear warmup
then cosine decay to 10% (then constant), and the batch-size ramp; all in tokens, as the paper.

The learning rate is a function of tokens seen, computed on the host in exact integers and
passed to the step: with a constant batch it is the same as converting tokens to steps, and with
the ramp (steps of different sizes) it stays what the paper describes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax

from gptjax.config import OptimConfig, TrainConfig

# Decayed: matmul kernels and the two embedding tables (as GPT-2/nanoGPT do). Not decayed:
# biases and LayerNorm gains/shifts, where shrinking towards 0 changes the function's scale and
# offset rather than limiting its complexity.
DECAYED_SUFFIXES = ("kernel", "wte", "wpe")


def decay_mask(params: Any) -> Any:
    """A tree of bools: True where weight decay applies."""

    def decayed(path: tuple[Any, ...], _: Any) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return name.endswith(DECAYED_SUFFIXES)

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip → Adam moments → decoupled weight decay. The result is the update direction for a
    learning rate of 1; the train step multiplies it by -lr(tokens).

    Clipping and decay are in the chain even when off (clip_norm 0 clips at infinity, weight
    decay 0 adds nothing, both exactly), so the optimizer state has one structure whatever
    their values: a run resumes under changed values instead of failing to restore."""
    clip = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
    )


def learning_rate(cfg: OptimConfig, tokens: int) -> float:
    """Linear warmup over warmup_tokens, cosine from the peak to min_lr_ratio·peak at
    decay_tokens, then constant at the floor."""
    peak = cfg.learning_rate
    floor = peak * cfg.min_lr_ratio
    if cfg.warmup_tokens > 0 and tokens < cfg.warmup_tokens:
        return peak * tokens / cfg.warmup_tokens
    if tokens >= cfg.decay_tokens:
        return floor
    span = cfg.decay_tokens - cfg.warmup_tokens
    progress = (tokens - cfg.warmup_tokens) / span if span > 0 else 1.0
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BatchSchedule:
    """Step sizes under GPT-3's batch ramp, the one place that knows them: how many microbatches
    each step accumulates, from ramp_start_tokens per step up to the full batch over
    ramp_tokens, in a few power-of-two sizes so that the train step compiles at most
    log2(microbatches) + 1 times; the tokens each step takes; the steps a run lasts.

    Sizes are functions of tokens seen (not of the step index): the ramp is defined in tokens,
    and a resumed run knows its tokens from the checkpoint."""

    def __init__(self, optim: OptimConfig, train: TrainConfig, context_length: int) -> None:
        self.microbatches = train.microbatches
        self.micro_size = train.batch_size // train.microbatches  # sequences
        self.seq_tokens = context_length
        self.micro_tokens = self.micro_size * context_length
        self.full_tokens = train.batch_size * context_length
        self.ramp_start = optim.ramp_start_tokens
        self.ramp_tokens = optim.ramp_tokens
        self.steps = train.steps
        self.total_tokens = train.total_tokens

    def sizes(self) -> list[int]:
        """Every microbatch count a step may take: powers of two below the full count, and it."""
        out, n = [], 1
        while n < self.microbatches:
            out.append(n)
            n *= 2
        return [*out, self.microbatches]

    def num_microbatches(self, tokens_seen: int) -> int:
        """Microbatches of the step taken after tokens_seen tokens."""
        if self.ramp_tokens <= 0 or tokens_seen >= self.ramp_tokens:
            return self.microbatches
        frac = tokens_seen / self.ramp_tokens
        want = self.ramp_start + frac * (self.full_tokens - self.ramp_start)
        n = max(1, math.ceil(want / self.micro_tokens))
        # Round down to an allowed size (never above the full batch).
        allowed = [s for s in self.sizes() if s <= n]
        return allowed[-1] if allowed else 1

    def tokens_per_step(self, tokens_seen: int) -> int:
        """Tokens of the step taken after tokens_seen tokens."""
        return self.num_microbatches(tokens_seen) * self.micro_tokens

    def extreme_sizes(self, tokens_seen: int) -> list[int]:
        """The fewest and the most microbatches a step takes from tokens_seen on (one entry when
        they are equal), ascending: the batch shapes that bound a run's memory, one without the
        accumulation loop where the ramp still starts at one microbatch."""
        return sorted({self.num_microbatches(tokens_seen), self.microbatches})

    def total_steps(self) -> int:
        """train.steps when set, else the steps that reach train.total_tokens under the ramp
        (the last step may pass it)."""
        if self.steps > 0:
            return self.steps
        steps, tokens = 0, 0
        while tokens < self.total_tokens:
            if tokens >= self.ramp_tokens:  # full steps from here on
                return steps + -(-(self.total_tokens - tokens) // self.full_tokens)
            tokens += self.tokens_per_step(tokens)
            steps += 1
        return steps
