"""An OpenAI-compatible completion server over a training run, with continuous batching.

    python -m gptjax.serve --checkpoint RUN_DIR [--step N] [--host 127.0.0.1] [--port 8000]
        [--max-batch 32] [--api-key KEY] [--steps-per-call 4] [--shutdown-timeout 10]
        [--mesh DATA,FSDP,TENSOR] [--adapter NAME=LORA_RUN_DIR ...]
    python -m gptjax.serve --dry-run --topology SLICE (--checkpoint RUN_DIR | --config PRESET)

POST /v1/completions, GET /v1/models, GET /health, and the tokenizer endpoints lm-eval's
`local-completions` uses to count tokens (/tokenizer_info, /tokenize, /detokenize). Requests share
one engine thread (gptjax/serve/engine.py); this module only speaks HTTP. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import fastapi
import uvicorn
from jax.sharding import Mesh
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gptjax import checkpoint, sharding, tokenizer
from gptjax.config import MeshConfig, config_from_dict
from gptjax.cli import OneLineParser, int_at_least, nonneg_int, positive_int, run_cli, user_path
from gptjax.errors import UserError
from gptjax.serve import models as models_lib
from gptjax.serve import playground
from gptjax.serve.engine import Choice, Engine, Event, key_data
from gptjax.serve.protocol import (ApiError, CompletionRequest, find_stop, logprobs_json,
                                   parse_completion, safe_end)
from gptjax.tokenizer import Tokenizer

MAX_BODY_BYTES = 4 << 20


class _ChoiceState:
    """What one choice has produced so far, after stop sequences."""

    def __init__(self, index: int, prompt: list[int], prompt_text: str) -> None:
        self.index, self.prompt, self.prompt_text = index, prompt, prompt_text
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.prompt_lp: tuple[list[float], list[list[tuple[int, float]]]] | None = None
        self.text = ""
        self.finish: str | None = None
        self.sent_text, self.sent_tokens, self.echoed = 0, 0, False


class CompletionRun:
    """One /v1/completions request in flight: its choices in the engine, their events merged
    into one asyncio queue (the engine thread hands them over with call_soon_threadsafe)."""

    def __init__(self, req: CompletionRequest, engine: Engine, tok: Tokenizer,
                 adapter: int = 0) -> None:
        self.req, self.engine, self.tok = req, engine, tok
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.states: list[_ChoiceState] = []
        self.choices: list[Choice] = []
        for p, (prompt, text) in enumerate(zip(req.prompts, req.texts)):
            for j in range(req.n):
                i = p * req.n + j
                self.states.append(_ChoiceState(i, prompt, text))
                self.choices.append(Choice(
                    prompt, req.max_tokens, self._emitter(i), temperature=req.temperature,
                    top_k=req.top_k, top_p=req.top_p,
                    # Sample j of a prompt has the stream (seed, j), alone or in a list.
                    key_data=key_data(req.seed, j),
                    echo_logprobs=req.echo and req.logprobs is not None, adapter=adapter))

    def _emitter(self, i: int) -> Any:
        def emit(ev: Event) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (i, ev))
        return emit

    def start(self) -> None:
        for c in self.choices:
            self.engine.submit(c)

    def cancel(self) -> None:
        for c, s in zip(self.choices, self.states):
            if s.finish is None:
                self.engine.cancel(c)

    def done(self) -> bool:
        return all(s.finish is not None for s in self.states)

    async def next(self) -> _ChoiceState:
        """Waits for the next event and folds it into its choice's state."""
        i, ev = await self.events.get()
        s = self.states[i]
        if s.finish is not None:  # a choice ended by a stop sequence: the rest is moot
            return s
        if ev.prompt_logprobs is not None:
            s.prompt_lp = ev.prompt_logprobs
        s.ids += ev.tokens
        s.lps += ev.logprobs
        s.tops += ev.top
        s.text = self.tok.decode(s.ids)
        at = find_stop(s.text, self.req.stop)
        if at is not None:
            s.text, s.finish = s.text[:at], "stop"
            n = 0
            while n < len(s.ids) and len(self.tok.decode(s.ids[:n])) < at:
                n += 1
            del s.ids[n:], s.lps[n:], s.tops[n:]
            self.engine.cancel(self.choices[i])
        elif ev.finish is not None:
            if ev.finish.startswith("error"):
                raise ApiError(500, f"the engine failed ({ev.finish})", kind="server_error")
            s.finish = ev.finish
        return s

    def logprobs(self, s: _ChoiceState, echo: bool, ids_from: int = 0) -> dict[str, Any] | None:
        """The logprobs object of s.ids[ids_from:], with the prompt's tokens first if echo."""
        k = self.req.logprobs
        if k is None:
            return None
        ids, lps, tops = s.ids[ids_from:], list(s.lps[ids_from:]), list(s.tops[ids_from:])
        offset = len(s.prompt_text) + len(self.tok.decode(s.ids[:ids_from]))
        if echo:
            p_lps, p_tops = s.prompt_lp or ([], [])
            ids = s.prompt + ids
            lps = [None, *p_lps, *lps]
            tops = [None, *p_tops, *tops]
            offset = 0
        return logprobs_json(self.tok, ids, lps, tops, k, offset)

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.req.prompts)
        completion = sum(len(s.ids) for s in self.states)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


def _head(model_name: str, rid: str, created: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model_name}


async def complete(run: CompletionRun, model_name: str) -> dict[str, Any]:
    """The whole response of a non-streaming request."""
    run.start()
    try:
        while not run.done():
            await run.next()
    finally:
        run.cancel()
    echo = run.req.echo
    choices = [{"index": s.index, "text": (s.prompt_text if echo else "") + s.text,
                "logprobs": run.logprobs(s, echo), "finish_reason": s.finish}
               for s in run.states]
    return {**_head(model_name, "cmpl-" + secrets.token_hex(12), int(time.time())),
            "choices": choices, "usage": run.usage()}


async def stream(run: CompletionRun, model_name: str) -> AsyncIterator[str]:
    """Server-sent events: a chunk per choice whenever it has new text, then [DONE]. A client
    that goes away closes this generator, and `finally` frees its slots."""
    head = _head(model_name, "cmpl-" + secrets.token_hex(12), int(time.time()))
    run.start()
    try:
        while not run.done():
            s = await run.next()
            end = safe_end(s.text, run.req.stop, s.finish is not None)
            echo = run.req.echo and not s.echoed
            if end <= s.sent_text and not echo and s.finish is None:
                continue
            n_ids = len(s.ids) if s.finish is not None or end == len(s.text) else s.sent_tokens
            lp = run.logprobs(s, echo, s.sent_tokens)
            if lp is not None and n_ids < len(s.ids):
                cut = n_ids - s.sent_tokens + (len(s.prompt) if echo else 0)
                lp = {k: v[:cut] for k, v in lp.items()}
            text = (s.prompt_text if echo else "") + s.text[s.sent_text:end]
            s.sent_text, s.sent_tokens, s.echoed = max(end, s.sent_text), n_ids, True
            chunk = {**head, "choices": [{"index": s.index, "text": text, "logprobs": lp,
                                          "finish_reason": s.finish}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        if run.req.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': run.usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()


async def _read_json(request: fastapi.Request) -> Any:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(400, f"the request body is over {MAX_BODY_BYTES} bytes", code="too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(400, f"the request body is over {MAX_BODY_BYTES} bytes",
                           code="too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


async def _unless_gone(request: fastapi.Request, work: Any) -> Any:
    """Awaits `work`, cancelling it (and so freeing its slots) if the client disconnects."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            return JSONResponse(ApiError(499, "the client went away").body(), status_code=499)


def make_app(engine: Engine, tok: Tokenizer, model_name: str, api_key: str | None = None,
             models: dict[str, int] | None = None, root: str | None = None, *,
             step: int | None = None, ui: bool = True) -> fastapi.FastAPI:
    """The FastAPI application over a started engine. models: name -> the engine's adapter
    index, for a server of several LoRA adapters over one base (`root`, index 0); default:
    model_name alone. A request without `model` gets model_name. ui: the playground page at /
    (static/; step is what it shows of the run)."""
    models = models or {model_name: 0}
    root = root or model_name
    app = fastapi.FastAPI(title="gptjax", docs_url=None, redoc_url=None, openapi_url=None)
    ctx = engine.max_len

    def check_key(request: fastapi.Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "Incorrect or missing API key (send 'Authorization: Bearer "
                                "KEY').", code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(_: fastapi.Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: fastapi.Request, e: HTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=code).body(),
                            status_code=e.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        busy, waiting = engine.busy()
        return {"status": "ok", "slots": engine.S, "slots_busy": busy, "waiting": waiting,
                **engine.stats}

    @app.get("/v1/models")
    async def list_models(request: fastapi.Request) -> dict[str, Any]:
        check_key(request)
        # As multi-LoRA servers list them: each adapter's root and parent is the base.
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "gptjax",
             "context_length": ctx, "max_model_len": ctx, "root": root,
             "parent": None if name == root else root} for name in models]}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request) -> Any:
        check_key(request)
        body = await _read_json(request)
        name = body.get("model") if isinstance(body, dict) else None
        name = model_name if name is None else name
        if not isinstance(name, str) or name not in models:
            have = ", ".join(f"'{n}'" for n in models)
            raise ApiError(404, f"The model '{name}' does not exist; this server has {have}.",
                           param="model", code="model_not_found")
        req = parse_completion(body, tok, ctx)
        run = CompletionRun(req, engine, tok, adapter=models[name])
        if req.stream:
            return StreamingResponse(stream(run, name), media_type="text/event-stream")
        return await _unless_gone(request, complete(run, name))

    @app.get("/info")
    async def info(request: fastapi.Request) -> dict[str, Any]:
        check_key(request)
        return {"model": model_name, "models": list(models), "step": step,
                "tokenizer": tok.name, "context_length": ctx}

    _tokenizer_routes(app, tok, check_key)
    if ui:
        playground.routes(app)
    return app


def _tokenizer_routes(app: fastapi.FastAPI, tok: Tokenizer, check_key: Any) -> None:
    """What lm-eval's remote tokenizer asks (vLLM's routes): clients count tokens our way."""

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: fastapi.Request) -> dict[str, Any]:
        check_key(request)
        # No end-of-text string: its text encodes as ordinary bytes, not as the EOT id.
        return {"eos_token": None, "bos_token": None, "pad_token": None,
                "tokenizer": tok.name, "vocab_size": tok.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: fastapi.Request) -> dict[str, Any]:
        check_key(request)
        body = await _read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ApiError(400, "'prompt' must be a string", param="prompt")
        ids = tok.encode(body["prompt"])
        return {"tokens": ids, "count": len(ids), "max_model_len": None}

    @app.post("/detokenize")
    async def detokenize(request: fastapi.Request) -> dict[str, Any]:
        check_key(request)
        body = await _read_json(request)
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tok.vocab_size
                for t in ids):
            raise ApiError(400, "'tokens' must be a list of token ids", param="tokens")
        return {"prompt": tok.decode(ids)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m gptjax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", metavar="RUN_DIR", type=user_path,
                   help="a training run directory (holding checkpoints/); required but with "
                        "--dry-run --config")
    p.add_argument("--step", type=nonneg_int, help="checkpoint step (default: the latest)")
    p.add_argument("--adapter", action="append", type=models_lib.adapter_arg, default=[],
                   metavar="NAME=RUN_DIR",
                   help="also serve this LoRA run's adapters over the same base as model NAME "
                        "(repeatable); requests pick one by their `model` field")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="0: any free port")
    p.add_argument("--max-batch", type=positive_int, default=32,
                   help="decode slots: sequences decoded together")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: no key)")
    p.add_argument("--steps-per-call", type=positive_int, default=4,
                   help="decode steps per device call: new requests join between calls")
    p.add_argument("--shutdown-timeout", type=positive_int, default=10,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--mesh", type=mesh_sizes, default=None, metavar="DATA,FSDP,TENSOR",
                   help="serve on a mesh of the devices: slots split over data x fsdp, heads "
                        "over tensor (-1: what the others leave; default: one device)")
    p.add_argument("--no-ui", action="store_true",
                   help="do not serve the playground page at / (the API only)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --topology: compile the engine's programs for a TPU slice and "
                        "report XLA's memory per chip; serve nothing")
    p.add_argument("--topology", default=None, metavar="SLICE",
                   help="with --dry-run: the TPU slice (v5e:2x2, v5p-1024, ...)")
    p.add_argument("--config", default=None,
                   help="with --dry-run: a preset or configs/*.yaml instead of --checkpoint")
    a = p.parse_args(argv)
    if a.port > 65535:
        p.error(f"argument --port: must be in 0..65535, got {a.port}")
    if a.dry_run != (a.topology is not None):
        p.error("--dry-run and --topology go together: --dry-run --topology SLICE")
    if a.config is not None and not a.dry_run:
        p.error("--config is for --dry-run; a server loads its run's config from --checkpoint")
    if (a.checkpoint is None) == (a.config is None) and (a.dry_run or a.checkpoint is None):
        p.error("give --checkpoint RUN_DIR" + (" or --config PRESET" if a.dry_run else ""))
    return a


def mesh_sizes(text: str) -> MeshConfig:
    """--mesh DATA,FSDP,TENSOR."""
    parts = text.split(",")
    try:
        sizes = [int(x) for x in parts]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or any(x == 0 or x < -1 for x in sizes):
        raise argparse.ArgumentTypeError(f"want three sizes DATA,FSDP,TENSOR (each >= 1, or -1 "
                                         f"for the rest), got {text!r}")
    return MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])


def load(a: argparse.Namespace) -> tuple[models_lib.Served, Mesh | None]:
    """(the models --checkpoint and each --adapter give, mesh); with --mesh the weights are
    restored straight into their shards, so no device ever holds the whole model."""
    mesh, shardings = None, None
    if a.mesh is not None:
        mesh = sharding.make_mesh(a.mesh)
        sharding.check_batch(a.max_batch, mesh, "--max-batch")
        stored = config_from_dict(checkpoint.read_meta(a.checkpoint, a.step)[1]["config"])
        shardings = sharding.param_shardings(stored.model, mesh)
    return models_lib.load(a.checkpoint, a.step, shardings, a.adapter), mesh


def run(a: argparse.Namespace) -> int:
    if a.dry_run:
        from gptjax.serve import dryrun

        return dryrun.main(a)
    served, mesh = load(a)
    cfg, meta, step = served.cfg, served.meta, served.step
    tok = tokenizer.get_tokenizer(meta.get("tokenizer", cfg.data.tokenizer))
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the {tok.name} tokenizer has {tok.vocab_size} ids; the model "
                        f"{cfg.model.vocab_size}")
    engine = Engine(served.base, cfg.model, max_batch=a.max_batch, eos_id=tok.eot_id,
                    steps_per_call=a.steps_per_call, mesh=mesh, adapters=served.adapters)
    engine.start()
    print(f"gptjax.serve: {models_lib.describe(served)} step {step}, compiling...",
          file=sys.stderr, flush=True)
    engine.warm_up()
    app = make_app(engine, tok, served.default, a.api_key, served.names, served.root,
                   step=step, ui=not a.no_ui)
    server = uvicorn.Server(uvicorn.Config(
        app, host=a.host, port=a.port, access_log=False, log_level="info",
        timeout_graceful_shutdown=a.shutdown_timeout, timeout_keep_alive=5))
    # uvicorn re-raises the SIGTERM it handled once it has shut down; a no-op handler makes
    # that a clean exit 0 (SIGINT keeps its KeyboardInterrupt: exit 130).
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return run_cli("python -m gptjax.serve", lambda: run(a))

