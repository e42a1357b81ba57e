"""The serving engine: a fixed number of decode slots over one KV cache, continuous batching.

One thread owns the device. Each choice (one generated sequence of one request) takes a slot:
a jitted prefill writes its prompt into that slot's rows of the cache, then every decode call
advances all slots together a few steps, a per-slot mask leaving free slots untouched. A new
choice joins at the next call; a finished or cancelled one frees its slot at once. Sampling
settings are per-slot arrays, so one compiled program serves every request: the programs compile
once per prompt-length bucket (prefill) and per attention bucket (decode), not per request.

Tokens are chosen, and rows keyed, by `gptjax.decode.choose`, the rule `generate` (sample.py)
follows too: a completion is sample.py's text for the same prompt, settings and seed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gptjax import model, sharding
from gptjax.config import ModelConfig
from gptjax.errors import warn
from gptjax.lora import adapters as lora_adapters
from gptjax.model import GPT, LORA, init_cache, variables
from gptjax.decode.choose import choose_tokens, row_keys, step_keys
from gptjax.decode.generate import PROMPT_BUCKET, attend_buckets, decode_config

TOP_LOGPROBS = 5  # the most alternatives a request may ask for (OpenAI's limit)


def _log_probs(logits_BV: jax.Array, tok_B: jax.Array) -> tuple[jax.Array, ...]:
    """(log p of tok, top log-probs, their ids) of the model's own distribution (temperature and
    filters are how a token is chosen, not what the model predicts)."""
    lp = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    top_lp, top_id = jax.lax.top_k(lp, TOP_LOGPROBS)
    return jnp.take_along_axis(lp, tok_B[..., None], axis=-1)[..., 0], top_lp, top_id


def with_rows(params: Any, bank: Any, ids_B: jax.Array) -> dict[str, Any]:
    """The model's variables for a batch whose row b applies adapter ids_B[b] of the bank
    (gptjax.lora.adapters.bank; entry 0 is none): per-row adapters, one gather per call. No
    bank, no adapters: the program is the plain model's."""
    if bank is None:
        return variables(params)
    return {"params": params, LORA: jax.tree.map(lambda b: b[ids_B], bank)}


@functools.lru_cache(maxsize=8)
def programs(cfg: ModelConfig, max_len: int, eos_id: int) -> tuple[Callable, Callable]:
    """(prefill, decode) over a slot cache of `max_len` positions; cfg is the unrolled model."""

    def prefill(params: Any, bank: Any, cache: Any, tokens_1T: jax.Array, targets_1T: jax.Array,
                length: jax.Array, slot: jax.Array, adapter: jax.Array, with_logprobs: bool
                ) -> tuple[Any, Any]:
        """Writes `length` prompt tokens into slot `slot` (a fresh row: nothing of the slot's
        last occupant survives) through adapter `adapter` of the bank; with_logprobs: also the
        log-prob of each next prompt token."""
        T = tokens_1T.shape[1]
        row = init_cache(cfg, 1, max_len)
        x_1TD, row = GPT(cfg, attend_len=T).apply(
            with_rows(params, bank, adapter[None]), tokens_1T, cache=row,
            num_valid_B=length[None], return_hidden=True)
        layers = jax.tree.map(lambda big, r: jax.lax.dynamic_update_slice_in_dim(big, r, slot, 0),
                              cache["layers"], row["layers"])
        cache = {"index": cache["index"].at[slot].set(length), "layers": layers}
        if not with_logprobs:
            return cache, None
        logits_TV = model.logits_from_hidden(x_1TD, params["wte"], cfg)[0]
        return cache, _log_probs(logits_TV, targets_1T[0])

    def decode(params: Any, bank: Any, cache: Any, st: dict[str, jax.Array], steps: int,
               attend_len: int) -> tuple[Any, dict[str, jax.Array], tuple[jax.Array, ...]]:
        """`steps` tokens for every active slot, each through its own adapter; a slot goes
        inactive after end-of-text or when its token budget `left` runs out."""
        logits_fn = GPT(cfg, attend_len)
        keys_S = jax.random.wrap_key_data(st["keys"])
        model_vars = with_rows(params, bank, st["adapter"])

        def body(carry: tuple[Any, dict], _: None) -> tuple[tuple[Any, dict], tuple]:
            cache, s = carry
            active = s["active"]
            logits, cache = logits_fn.apply(model_vars, s["last"][:, None], cache=cache,
                                            num_valid_B=active.astype(jnp.int32))
            logits_SV = logits[:, 0]
            tok = choose_tokens(logits_SV, step_keys(keys_S, s["count"]), s["temperature"],
                                s["top_k"], s["top_p"])
            lp, top_lp, top_id = _log_probs(logits_SV, tok)
            ended = (tok == eos_id) | (s["left"] <= 1)
            step = active.astype(jnp.int32)
            s = dict(s, last=jnp.where(active, tok, s["last"]), count=s["count"] + step,
                     left=s["left"] - step, active=active & ~ended)
            return (cache, s), (tok, active, lp, top_lp, top_id)

        (cache, st), outs = jax.lax.scan(body, (cache, st), None, length=steps)
        return cache, st, outs

    return (jax.jit(prefill, donate_argnames=("cache",), static_argnames=("with_logprobs",)),
            jax.jit(decode, donate_argnames=("cache",), static_argnames=("steps", "attend_len")))


def placement(cfg: ModelConfig, mesh: Mesh | None, max_batch: int, max_len: int
              ) -> tuple[Any, Any]:
    """(parameter, slot-cache) shardings of the engine for `cfg` (the decode config): None, None
    on the default device without a mesh; else parameters as training shards them and the cache
    split over slots (data axes) and heads (tensor)."""
    if mesh is None:
        return None, None
    cache = jax.eval_shape(lambda: init_cache(cfg, max_batch, max_len))
    return sharding.param_shardings(cfg, mesh), sharding.cache_shardings(cache, mesh)


@dataclasses.dataclass
class Event:
    """What a choice gets from the engine, on the engine thread (hand it to your own loop)."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    prompt_logprobs: tuple[list[float], list[list[tuple[int, float]]]] | None = None
    finish: str | None = None  # "stop", "length", "cancelled" or "error: ..."


@dataclasses.dataclass(eq=False)
class Choice:
    """One sequence to generate. `emit` is called from the engine thread."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    key_data: np.ndarray | None = None  # uint32 [2]: the raw PRNG key of this choice
    echo_logprobs: bool = False
    adapter: int = 0  # which of the engine's adapters (0: none, the base model)
    cancelled: bool = False  # set by anyone; the engine frees the slot at its next call


def key_data(seed: int, index: int) -> np.ndarray:
    """The raw key of choice `index` of a request seeded `seed` (`choose.row_keys`, as sample
    `index` of `generate(..., seed=seed)`): the same seed and index give the same stream
    whichever slot and neighbours the choice gets."""
    return np.asarray(jax.random.key_data(row_keys(jax.random.key(seed), np.array([index]))[0]))


class Engine:
    """Owns the device: call `start`, then `submit` choices from any thread."""

    def __init__(self, params: Any, cfg: ModelConfig, *, max_batch: int, eos_id: int,
                 steps_per_call: int = 4, mesh: Mesh | None = None,
                 adapters: list[Any] | None = None) -> None:
        """params: the base weights (as trained: scanned or not). adapters: LoRA adapter trees
        in inference form (gptjax.lora.adapters.scaled) in params' layout; Choice.adapter i + 1
        applies adapters[i], 0 none. params carrying adapters under "lora" (a LoRA run as
        runs.load_model gives it) are its base and adapter 1, `adapters` following from 2."""
        stacked = cfg
        if LORA in params:
            # Split off, not applied to every row: Choice.adapter 0 stays the bare base, and the
            # base alone matches the parameter shardings a mesh gives.
            adapters = [params[LORA], *(adapters or ())]
            params = {k: v for k, v in params.items() if k != LORA}
        self.cfg = decode_config(cfg)
        self.max_len, self.S, self.K = cfg.context_length, max_batch, steps_per_call
        self.eos_id, self.mesh = eos_id, mesh
        p_sh, self._cache_sh = placement(self.cfg, mesh, self.S, self.max_len)
        # Cast and unstack once here, not in every call (generate.programs does it per call).
        self.params = jax.device_put(model.unstack_layers(
            model.cast_to_compute_dtype(params, stacked), stacked), p_sh)
        self.n_adapters = len(adapters or ())
        self.bank = None
        if adapters:
            # Replicated on a mesh: a bank is small next to the weights it adapts.
            bank = lora_adapters.bank([model.unstack_layers(a, stacked) for a in adapters])
            self.bank = jax.device_put(bank, None if mesh is None else sharding.replicated(mesh))
        self._prefill, self._decode = programs(self.cfg, self.max_len, eos_id)
        self._cache = self._new_cache()
        S = self.S
        self._st = {"last": np.zeros(S, np.int32), "active": np.zeros(S, bool),
                    "left": np.zeros(S, np.int32), "count": np.zeros(S, np.int32),
                    "temperature": np.zeros(S, np.float32), "top_k": np.zeros(S, np.int32),
                    "top_p": np.ones(S, np.float32), "keys": np.zeros((S, 2), np.uint32),
                    "adapter": np.zeros(S, np.int32)}
        self._pos = np.zeros(S, np.int64)  # tokens in each slot's cache
        self._slots: list[Choice | None] = [None] * S
        self._inbox: queue.SimpleQueue[Choice | None] = queue.SimpleQueue()
        self._waiting: collections.deque[Choice] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptjax-engine", daemon=True)
        self.stats = {"completed": 0, "cancelled": 0}

    # --- the server's side

    def start(self) -> None:
        self._thread.start()

    def submit(self, choice: Choice) -> None:
        self._inbox.put(choice)

    def cancel(self, choice: Choice) -> None:
        choice.cancelled = True
        self._inbox.put(None)  # wake the engine if it sleeps

    def busy(self) -> tuple[int, int]:
        """(slots in use, choices waiting for one)."""
        return sum(c is not None for c in self._slots), len(self._waiting) + self._inbox.qsize()

    def close(self, timeout: float = 10.0) -> None:
        """Stops the thread; choices still running or waiting end "cancelled"."""
        self._stop.set()
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def warm_up(self) -> None:
        """Compiles the programs a short request needs, before the first client waits on them."""
        left = threading.Semaphore(0)
        for echo in (False, True):  # the prefill's two variants
            self.submit(Choice([0, 0], 2, lambda e: e.finish and left.release(), temperature=0.0,
                               key_data=key_data(0, 0), echo_logprobs=echo))
        left.acquire()
        left.acquire()

    # --- the engine thread

    def _new_cache(self) -> Any:
        return jax.jit(init_cache, static_argnums=(0, 1, 2), out_shardings=self._cache_sh)(
            self.cfg, self.S, self.max_len)

    def _run(self) -> None:
        # The model's sharding constraints resolve against the mesh while the programs trace.
        with contextlib.nullcontext() if self.mesh is None else sharding.activate(self.mesh):
            self._loop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = not self._st["active"].any() and not self._waiting
            self._take_inbox(block=idle)
            self._drop_cancelled()
            try:
                self._admit()
                if self._st["active"].any():
                    self._step()
            except Exception as e:  # noqa: BLE001 - one bad call must not take the server down
                warn(f"serving engine: {type(e).__name__}: {e}")
                self._fail_all(f"error: {type(e).__name__}")
        self._fail_all("cancelled")

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _finish(self, slot: int, why: str) -> None:
        c = self._slots[slot]
        self._slots[slot] = None
        self._st["active"][slot] = False
        if c is not None:
            self.stats["cancelled" if why == "cancelled" else "completed"] += 1
            c.emit(Event(finish=why))

    def _drop_cancelled(self) -> None:
        for c in [c for c in self._waiting if c.cancelled]:
            self._waiting.remove(c)
            self.stats["cancelled"] += 1
            c.emit(Event(finish="cancelled"))
        for i, c in enumerate(self._slots):
            if c is not None and c.cancelled:
                self._finish(i, "cancelled")

    def _fail_all(self, why: str) -> None:
        for i in range(self.S):
            self._finish(i, why)
        while self._waiting:
            self._waiting.popleft().emit(Event(finish=why))
        self._cache = self._new_cache()  # a failed call may eat it

    def _admit(self) -> None:
        while self._waiting and None in self._slots:
            c = self._waiting.popleft()
            slot = self._slots.index(None)
            n = len(c.prompt) - 1  # the last prompt token is fed by the first decode step
            T = min(-(-max(n, 1) // PROMPT_BUCKET) * PROMPT_BUCKET, self.max_len)
            tokens, targets = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32)
            tokens[0, :n], targets[0, :n] = c.prompt[:-1], c.prompt[1:]
            try:
                self._cache, lp = self._prefill(self.params, self.bank, self._cache, tokens,
                                                targets, np.int32(n), np.int32(slot),
                                                np.int32(c.adapter),
                                                with_logprobs=c.echo_logprobs)
            except Exception as e:  # noqa: BLE001 - popped from the queue: finish it here too
                c.emit(Event(finish=f"error: {type(e).__name__}"))
                raise
            first = Event()
            if lp is not None:
                tok_lp, top_lp, top_id = jax.device_get(lp)
                first.prompt_logprobs = (tok_lp[:n].tolist(), _pairs(top_id[:n], top_lp[:n]))
            if c.max_tokens == 0:
                first.finish = "length"
                self.stats["completed"] += 1
                c.emit(first)
                continue
            if lp is not None:
                c.emit(first)
            self._slots[slot], self._pos[slot] = c, n
            st = self._st
            st["last"][slot], st["active"][slot] = c.prompt[-1], True
            st["left"][slot] = c.max_tokens
            st["count"][slot], st["temperature"][slot] = 0, c.temperature
            st["top_k"][slot], st["top_p"][slot], st["keys"][slot] = c.top_k, c.top_p, c.key_data
            st["adapter"][slot] = c.adapter

    def _step(self) -> None:
        active = self._st["active"]
        need = min(int(self._pos[active].max()) + self.K, self.max_len)
        attend_len = next(b for b in attend_buckets(self.max_len) if b >= need)
        self._cache, st, outs = self._decode(self.params, self.bank, self._cache, self._st,
                                             steps=self.K, attend_len=attend_len)
        st, (tok, live, lp, top_lp, top_id) = jax.device_get((st, outs))
        self._st = {k: np.array(v) for k, v in st.items()}
        for i, c in enumerate(self._slots):
            if c is None:
                continue
            mine = live[:, i]
            self._pos[i] += int(mine.sum())
            ids = tok[mine, i].tolist()
            ev = Event(ids, lp[mine, i].tolist(), _pairs(top_id[mine, i], top_lp[mine, i]))
            if ids and ids[-1] == self.eos_id:
                # End-of-text ends the text; it is not part of it.
                ev.tokens, ev.logprobs, ev.top = ids[:-1], ev.logprobs[:-1], ev.top[:-1]
                ev.finish = "stop"
            elif not self._st["active"][i]:
                ev.finish = "length"
            if ev.finish:
                self._slots[i] = None
                self.stats["completed"] += 1
            c.emit(ev)


def _pairs(ids: np.ndarray, lps: np.ndarray) -> list[list[tuple[int, float]]]:
    return [list(zip(i.tolist(), p.tolist())) for i, p in zip(ids, lps)]
