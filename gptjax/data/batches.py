"""Batches: windows of context_length + 1 tokens cut from the token cache, in a seeded order for
training and in order for evaluation, each process taking its rows of every global batch.

The training order is a keyed bijection of the window indices (no buffer, no stored permutation),
so an iterator's position is three numbers and a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import importlib.util
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from gptjax.config import Config
from gptjax.data.integrity import CorruptCacheError, fix_hint
from gptjax.data.load import CachedSplit, open_split
from gptjax.data.sources import DataError, import_tf
from gptjax.data.store import TokenArray


def num_windows(n_tokens: int, context_length: int, stride: int) -> int:
    """How many windows of context_length + 1 tokens, `stride` apart, fit in n_tokens."""
    span = context_length + 1
    return 0 if n_tokens < span else (n_tokens - span) // stride + 1


_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit avalanche mix (splitmix64's finalizer) of a uint64 array."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, seed: int, epoch: np.ndarray | int) -> np.ndarray:
    """The image of `index` under a pseudo-random bijection of [0, n) keyed by (seed, epoch).

    A 4-round Feistel network on the smallest even-width bit domain that holds n; values that land
    outside [0, n) are mapped again until they fall inside ("cycle walking"), which keeps it a
    bijection. Unlike a stored permutation it costs no memory, whatever the dataset size, and
    position k of any epoch is computed directly.
    """
    index = np.asarray(index, dtype=np.int64)
    if n <= 0:
        raise ValueError("n must be positive")
    if index.size and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"index out of range [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    epoch = np.broadcast_to(np.asarray(epoch, dtype=np.uint64), index.shape)
    base = _mix64(np.full(index.shape, seed & _MASK64, dtype=np.uint64) ^ np.uint64(0x5EED))
    base = _mix64(base ^ _mix64(epoch + np.uint64(0x9E3779B97F4A7C15)))
    keys = [_mix64(base + np.uint64(r + 1)) for r in range(4)]
    x = index.astype(np.uint64)
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        y = x[todo]
        left, right = y >> shift, y & mask
        for key in keys:
            k = key[todo]
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        x[todo] = (left << shift) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


def _check_processes(
    batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if batch_size <= 0 or batch_size % process_count:
        raise DataError(
            f"batch size {batch_size} is not a positive multiple of the {process_count} processes"
        )
    return process_index, process_count, batch_size // process_count


def _check_split(cfg: Config, opened: CachedSplit) -> None:
    """Checks that the model can embed every id of the tokenizer that built the cache (its
    manifest's record) and that the split holds a window."""
    if opened.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"data.tokenizer={opened.manifest['tokenizer']['name']} has {opened.vocab_size} ids "
            f"but model.vocab_size={cfg.model.vocab_size}"
        )
    T = cfg.model.context_length
    if len(opened.tokens) < T + 1:
        raise DataError(
            f"the {opened.split} split of data.source={cfg.data.source!r} has "
            f"{len(opened.tokens)} tokens, fewer than one window of model.context_length + 1 = "
            f"{T + 1}"
        )


def _id_check(opened: CachedSplit) -> Callable[[np.ndarray, np.ndarray], None]:
    """A check of the rows cut at `starts` ([N, S] int32): every id below the vocabulary, or a
    CorruptCacheError naming the first bad one and where it lies. Checksums catch a cache changed
    on disk; this also catches what they cannot (bits that rot under an unchanged stat, a cache
    written by other code) before the model sees an id its embedding does not have (a gather out
    of range gives NaN or garbage, not an error)."""
    # Plain values only: the check runs on tf.data's threads.
    limit, split, locate = opened.vocab_size, opened.split, opened.locate
    hint = fix_hint(opened.path)

    def check(x_NS: np.ndarray, starts: np.ndarray) -> None:
        # As uint32, an id of a uint32 cache that wrapped negative in int32 is large again: one
        # reduction catches both.
        ids = x_NS.view(np.uint32)
        if not ids.size or ids.max() < limit:
            return
        row, col = np.argwhere(ids >= limit)[0]
        file, at = locate(int(starts[row]) + int(col))
        raise CorruptCacheError(
            f"token id {ids[row, col]} at token {at} of {file} ({split} split) is not below "
            f"the vocabulary size {limit}; {hint}"
        )

    return check


def _window_mask(mask: TokenArray | None, starts: np.ndarray, T: int) -> np.ndarray:
    """float32 [len(starts), T]: the weights of the targets of the windows at `starts`, i.e. of
    tokens start + 1 ... start + T (all ones without a mask)."""
    if mask is None:
        return np.ones((len(starts), T), np.float32)
    return mask.rows(np.asarray(starts) + 1, T, np.float32)


def pipeline_kind(pipeline: str) -> str:
    """data.pipeline resolved: `auto` is tf.data where TensorFlow is installed, else threads."""
    if pipeline != "auto":
        return pipeline
    return "tf.data" if importlib.util.find_spec("tensorflow") is not None else "threads"


def _threaded(rows: Callable[[np.int64], tuple[np.ndarray, np.ndarray]], prefetch: int
              ) -> Iterator[dict[str, np.ndarray]]:
    """What the tf.data pipeline yields, from a pool of threads: batch b = rows(b), in order,
    with `prefetch` batches (at least one per thread) in flight while the caller's step runs.
    Cutting a batch is a few numpy gathers over the memory-mapped cache."""
    threads = min(4, os.cpu_count() or 1)
    ahead = max(prefetch, threads) if prefetch else 0
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="gptjax-batches")
    queued: collections.deque = collections.deque()
    b = 0
    try:
        while True:
            while len(queued) <= ahead:
                queued.append(pool.submit(rows, np.int64(b)))
                b += 1
            x, m = queued.popleft().result()
            yield {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": m}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# Live pipelines, closed before interpreter shutdown: tf.data threads still calling
# numpy_function while Python finalizes can deadlock the exit.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for it in list(_LIVE):
        it.close()


class TrainIterator:
    """Training batches of windows in a seeded order, this process's rows of each global batch.

    Epoch e visits every window once, in the order `permute(·, windows, seed, e)`; global batch b
    takes the next `batch_size` positions of the endless sequence of epochs (a batch may straddle
    two epochs), and process p takes rows [p·L, (p+1)·L) of it, L = batch_size // process_count.
    The position is therefore the same small state on every process. A batch holding an id
    outside the vocabulary is never yielded: `next` raises CorruptCacheError, position unchanged.

    Yields:
        {"inputs": int32 [L, T], "targets": int32 [L, T] (inputs shifted by one),
         "mask": float32 [L, T] (the targets' loss weights: 0 on prompt tokens of
         prompt/completion records, 1 elsewhere)}
    """

    def __init__(
        self,
        cfg: Config,
        batch_size: int,
        *,
        state: dict | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.process_index, self.process_count, self.local_batch_size = _check_processes(
            batch_size, process_index, process_count
        )
        self.batch_size = batch_size
        opened = open_split(cfg, "train", self.process_index)
        _check_split(cfg, opened)
        self.tokens, self.mask = opened.tokens, opened.mask
        self._check_ids = _id_check(opened)
        self.context_length = cfg.model.context_length
        self.stride = cfg.data.stride or self.context_length  # 0 means windows that do not overlap
        self.tokenizer = cfg.data.tokenizer
        self.windows = num_windows(len(self.tokens), self.context_length, self.stride)
        self.seed = cfg.data.seed
        self.prefetch = cfg.data.prefetch
        self.pipeline = pipeline_kind(cfg.data.pipeline)
        self._position = 0  # of the next window, counted over all epochs
        if state is not None:
            self._restore(state)
        self._it: Iterator | None = None
        # What the batch function raised, by batch of the pipeline. An exception raised inside
        # tf.data reaches the caller as a TensorFlow error with the Python traceback in its text,
        # and TensorFlow logs that traceback to stderr from each of its threads, whatever
        # TF_CPP_MIN_LOG_LEVEL says; so the batch function returns a placeholder instead and
        # __next__ raises the original exception in its place.
        self._failed: dict[int, Exception] = {}
        self._made_at = 0

    def _restore(self, state: dict) -> None:
        try:
            seed, epoch, index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"not a data iterator state: {state!r}") from None
        if state.get("tokenizer", self.tokenizer) != self.tokenizer:
            raise DataError(
                f"the data state was saved with tokenizer {state['tokenizer']} but "
                f"data.tokenizer={self.tokenizer}"
            )
        if state.get("windows", self.windows) != self.windows:
            raise DataError(
                f"the data state was saved over {state['windows']} windows but the data now has "
                f"{self.windows} (source, tokenizer, context_length or stride changed)"
            )
        if epoch < 0 or not 0 <= index < self.windows:
            raise DataError(f"data state out of range: {state!r}")
        # The state's seed wins over the config's: it is what makes the resumed order exact.
        self.seed = seed
        self._position = epoch * self.windows + index

    def get_state(self) -> dict:
        """Where the next batch starts: JSON-able, identical on every process."""
        epoch, index = divmod(self._position, self.windows)
        return {
            "seed": self.seed,
            "epoch": epoch,
            "index": index,
            "windows": self.windows,
            "tokenizer": self.tokenizer,
        }

    def _batch_fn(self) -> Callable[[np.int64], tuple[np.ndarray, np.ndarray]]:
        # Plain locals, so tf.data's threads hold no reference to the iterator itself.
        tokens, mask, n, seed, stride = self.tokens, self.mask, self.windows, self.seed, self.stride
        start = self._position + self.process_index * self.local_batch_size
        step, T = self.batch_size, self.context_length
        offsets = np.arange(self.local_batch_size, dtype=np.int64)
        check, failed = self._check_ids, self._failed
        L = self.local_batch_size
        placeholder = np.zeros((L, T + 1), np.int32), np.zeros((L, T), np.float32)

        def rows(b: np.int64) -> tuple[np.ndarray, np.ndarray]:
            try:
                epoch, index = np.divmod(start + int(b) * step + offsets, n)
                starts = permute(index, n, seed, epoch) * stride
                x = tokens.rows(starts, T + 1, np.int32)
                check(x, starts)
                return x, _window_mask(mask, starts, T)
            except Exception as e:
                failed[int(b)] = e
                return placeholder

        return rows

    def _make(self) -> Iterator:
        if self.pipeline == "threads":
            return _threaded(self._batch_fn(), self.prefetch)
        tf = import_tf()
        rows = self._batch_fn()
        L, T = self.local_batch_size, self.context_length

        def load(b: Any) -> dict:
            x, m = tf.numpy_function(rows, [b], (tf.int32, tf.float32), stateful=False)
            x.set_shape([L, T + 1])
            m.set_shape([L, T])
            return {"inputs": x[:, :-1], "targets": x[:, 1:], "mask": m}

        ds = tf.data.Dataset.range(1 << 62).map(load, num_parallel_calls=tf.data.AUTOTUNE)
        if self.prefetch:
            ds = ds.prefetch(self.prefetch)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).as_numpy_iterator()

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._make()
            self._made_at = self._position  # batch b of the pipeline starts here + b·batch_size
            _LIVE.add(self)
        batch = next(self._it)
        error = self._failed.get((self._position - self._made_at) // self.batch_size)
        if error is not None:  # this batch is a placeholder: see __init__
            self.close()
            raise error
        self._position += self.batch_size
        return batch

    def close(self) -> None:
        """Stops the pipeline; the iterator can go on (it restarts where it was)."""
        it, self._it = self._it, None
        if hasattr(it, "close"):
            it.close()  # the thread pool's generator: cancels what it queued
        self._failed = {}

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eval_batches(
    cfg: Config,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every validation window once, in order, this process's rows of each global batch.

    Validation windows never overlap (stride = context_length, whatever data.stride), so each
    token is scored once. Every process yields the same number of batches; rows past the last
    window are zeros with mask 0. Within a window the mask is the targets' loss weights, as in
    `TrainIterator`, and an id outside the vocabulary raises CorruptCacheError.

    Yields:
        {"inputs", "targets": int32 [L, T], "mask": float32 [L, T]}, L = batch_size // processes.
    """
    index, _, local = _check_processes(batch_size, process_index, process_count)
    opened = open_split(cfg, "validation", index)
    _check_split(cfg, opened)
    T = cfg.model.context_length
    n = num_windows(len(opened.tokens), T, T)
    return _eval_iter(opened, n, T, batch_size, index * local, local)


def _eval_iter(
    opened: CachedSplit, n: int, T: int, batch_size: int, first: int, local: int
) -> Iterator[dict[str, np.ndarray]]:
    tokens, weights, check = opened.tokens, opened.mask, _id_check(opened)
    offsets = np.arange(local, dtype=np.int64)
    for b in range(-(-n // batch_size)):
        windows = b * batch_size + first + offsets
        valid = windows < n
        starts = windows[valid] * T
        x = tokens.rows(starts, T + 1, np.int32)
        check(x, starts)
        inputs = np.zeros((local, T), np.int32)
        targets = np.zeros((local, T), np.int32)
        mask = np.zeros((local, T), np.float32)
        inputs[valid], targets[valid] = x[:, :-1], x[:, 1:]
        mask[valid] = _window_mask(weights, starts, T)
        yield {"inputs": inputs, "targets": targets, "mask": mask}
