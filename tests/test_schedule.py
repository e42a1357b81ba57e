"""BatchSchedule owns the step sizes under the batch ramp: tokens per step, the shapes that bound
memory, and the steps a run lasts, each checked against a step-by-step walk of the ramp."""

from __future__ import annotations

from gptjax.config import OptimConfig, TrainConfig
from gptjax.train import optim

T = 128  # context length


def schedule(ramp_tokens: int = 40_000, ramp_start: int = 1024, *, steps: int = 0,
             total_tokens: int = 0, batch_size: int = 32, microbatches: int = 8
             ) -> optim.BatchSchedule:
    o = OptimConfig(ramp_start_tokens=ramp_start, ramp_tokens=ramp_tokens)
    t = TrainConfig(batch_size=batch_size, microbatches=microbatches, steps=steps,
                    total_tokens=total_tokens)
    return optim.BatchSchedule(o, t, T)


def walk(s: optim.BatchSchedule, total_tokens: int) -> list[int]:
    """Tokens per step, one step at a time, until total_tokens are reached."""
    out, tokens = [], 0
    while tokens < total_tokens:
        out.append(s.tokens_per_step(tokens))
        tokens += out[-1]
    return out


def test_sizes_in_tokens() -> None:
    s = schedule()
    assert s.micro_size == 4 and s.micro_tokens == 4 * T and s.full_tokens == 32 * T
    assert s.sizes() == [1, 2, 4, 8]
    assert schedule(microbatches=6, batch_size=36).sizes() == [1, 2, 4, 6]
    for tokens in (0, 5_000, 20_000, 39_999, 40_000, 10**6):
        n = s.num_microbatches(tokens)
        assert n in s.sizes() and s.tokens_per_step(tokens) == n * s.micro_tokens
    assert s.num_microbatches(0) == 2  # 1024 tokens = two microbatches of 4 x 128
    assert s.num_microbatches(40_000) == 8  # the ramp is over: the full batch


def test_extreme_sizes_are_the_current_and_the_full_batch() -> None:
    s = schedule(ramp_start=512)
    assert s.extreme_sizes(0) == [1, 8]
    assert s.extreme_sizes(20_000) == [s.num_microbatches(20_000), 8]
    assert s.extreme_sizes(40_000) == [8]  # ramp over: one shape
    assert schedule(ramp_tokens=0).extreme_sizes(0) == [8]


def test_total_steps_walks_the_ramp() -> None:
    for ramp in (0, 40_000, 123_457):
        for total in (1, 4096, 40_000, 41_000, 500_000):
            s = schedule(ramp, total_tokens=total)
            assert s.total_steps() == len(walk(s, total)), (ramp, total)


def test_total_steps_given_in_steps() -> None:
    assert schedule(steps=24, total_tokens=10**9).total_steps() == 24
    assert schedule(total_tokens=0).total_steps() == 0
