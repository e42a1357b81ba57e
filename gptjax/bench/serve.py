"""Load on the completion server: N concurrent greedy clients against gptjax.serve, in process."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import statistics
import threading
import time
from typing import Any

import jax
import numpy as np

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.errors import UserError
from gptjax.tokenizer import ByteTokenizer


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def bench_serve(cfg: ModelConfig, *, clients: int = 32, requests: int = 2, prompt_len: int = 128,
                new_tokens: int = 128, max_batch: int = 32, steps_per_call: int = 4,
                seed: int = 0) -> dict[str, Any]:
    """Latency and throughput of the HTTP server under `clients` concurrent greedy clients, each
    sending `requests` completions one after another (random weights, random prompt ids, no
    end-of-text, so every request decodes `new_tokens`), as `bench decode` does.

    Returns:
      {"latency_p50_s", "latency_p99_s", "tokens_per_s" (completion tokens over the wall time,
      prefills included), "wall_s", plus the settings}.
    """
    # Function-local: fastapi/uvicorn/httpx are the optional `serve` extra; the other
    # benchmarks must run without them.
    import httpx
    import uvicorn

    from gptjax.serve.app import make_app
    from gptjax.serve.engine import Engine

    if prompt_len + new_tokens > cfg.context_length:
        raise UserError(f"prompt_len={prompt_len} + new_tokens={new_tokens} exceed the context "
                        f"of {cfg.context_length}")
    cfg = dataclasses.replace(cfg, param_dtype=cfg.dtype)
    params = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(seed))
    # eos_id -1: no token ends a request early, as in `bench decode`.
    engine = Engine(params, cfg, max_batch=max_batch, eos_id=-1, steps_per_call=steps_per_call)
    engine.start()
    engine.warm_up()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(engine, ByteTokenizer(), "bench"),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    rng = np.random.default_rng(seed)
    vocab = min(cfg.vocab_size, 256)

    def body() -> dict[str, Any]:
        return {"prompt": rng.integers(0, vocab, prompt_len).tolist(), "max_tokens": new_tokens,
                "temperature": 0}

    async def run(n_clients: int, n_requests: int) -> tuple[list[float], int, float]:
        latencies: list[float] = []
        tokens = 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                     limits=httpx.Limits(max_connections=n_clients)) as h:
            async def one() -> None:
                nonlocal tokens
                for _ in range(n_requests):
                    t = time.perf_counter()
                    r = await h.post("/v1/completions", json=body())
                    r.raise_for_status()
                    latencies.append(time.perf_counter() - t)
                    tokens += r.json()["usage"]["completion_tokens"]
            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n_clients)))
            return latencies, tokens, time.perf_counter() - t0

    try:
        asyncio.run(run(min(clients, max_batch), 1))  # compile every bucket the load reaches
        latencies, tokens, wall = asyncio.run(run(clients, requests))
    finally:
        server.should_exit = True
        thread.join(30)
        engine.close()
    return {
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "dtype": cfg.dtype, "n_params": model.count_params(cfg), "clients": clients,
        "requests_per_client": requests, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "max_batch": max_batch, "steps_per_call": steps_per_call,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": _percentile(latencies, 99), "wall_s": wall,
        "completion_tokens": tokens, "tokens_per_s": tokens / wall,
    }
