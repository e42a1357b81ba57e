"""gptjax.serve end to end: the real server in a subprocess on a free 127.0.0.1 port, over a tiny
freshly initialised run, spoken to with the official `openai` client, httpx and lm-eval."""

from __future__ import annotations

import asyncio
import glob
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from gptjax import checkpoint, config, model
from helpers import process_env, write_run

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
CTX = 64


def make_run(d: Path) -> Path:
    cfg = config.config_from_dict({
        "model": {"vocab_size": 257, "context_length": CTX, "n_layer": 2, "d_model": 32,
                  "n_head": 4, "d_ff": 64, "local_window": 8, "vocab_multiple": 128},
        "data": {"tokenizer": "byte"},
    })
    return write_run(d, cfg, step=7)


def env() -> dict[str, str]:
    # A plain single-device process, as a user would start it (not conftest's 8 devices).
    return process_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptjax.serve", "--checkpoint", str(run_dir), "--port",
         str(port), *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("the server did not come up: " + proc.stdout.read().decode())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("serve") / "tinyrun")


@pytest.fixture(scope="module")
def server(run_dir: Path) -> Iterator[str]:
    proc, url = start_server(run_dir, "--api-key", KEY, "--max-batch", "16")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def params(run_dir: Path) -> tuple:
    p, cfg, _, _ = checkpoint.load_params(run_dir)
    return p, cfg.model


def forward_logprobs(params: tuple, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1, from one full forward pass."""
    p, cfg = params
    logits = model.GPT(cfg).apply({"params": p}, jnp.asarray([ids], jnp.int32))[0]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return np.asarray(lp[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])])


def test_greedy_text_equals_sample_cli(client: openai.OpenAI, run_dir: Path) -> None:
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(run_dir), "--prompt",
                        "def f(x):", "--greedy", "--json", "--max-new-tokens", "20"],
                       cwd=ROOT, env=env(), capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    want = json.loads(r.stdout)["samples"][0]
    got = client.completions.create(model="tinyrun", prompt="def f(x):", max_tokens=20,
                                    temperature=0)
    assert got.choices[0].text == want["text"]
    assert got.usage.prompt_tokens == 9 and got.usage.completion_tokens == want["tokens"]
    assert got.choices[0].finish_reason == "length"


def test_stream_yields_the_same_text_in_chunks(client: openai.OpenAI) -> None:
    kw = dict(model="tinyrun", prompt=["hello", "def "], max_tokens=30, temperature=0)
    whole = client.completions.create(**kw)
    parts: dict[int, list[str]] = {0: [], 1: []}
    finish = {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            parts[c.index].append(c.text)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    for c in whole.choices:
        assert "".join(parts[c.index]) == c.text
        assert len([p for p in parts[c.index] if p]) > 1  # really in pieces
        assert finish[c.index] == c.finish_reason


def test_echo_logprobs_equal_a_forward_pass(client: openai.OpenAI, params: tuple) -> None:
    prompt = "The quick brown fox"
    r = client.completions.create(model="tinyrun", prompt=prompt, max_tokens=3, temperature=0,
                                  echo=True, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(prompt)
    n = len(prompt)
    assert lp.tokens[:n] == list(prompt) and len(lp.tokens) == n + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[:n] == list(range(n))
    want = forward_logprobs(params, list(prompt.encode()))
    np.testing.assert_allclose(lp.token_logprobs[1:n], want, atol=1e-4)
    # Greedy: each generated token is its position's most likely one.
    for t, top in zip(lp.tokens[n:], lp.top_logprobs[n:]):
        assert max(top, key=top.get) == t and len(top) == 3
    # max_tokens 0 with echo: the prompt's scores alone.
    r0 = client.completions.create(model="tinyrun", prompt=prompt, max_tokens=0, echo=True,
                                   logprobs=0)
    assert r0.choices[0].text == prompt and r0.choices[0].logprobs.tokens == list(prompt)
    assert r0.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n]


def test_n_samples_with_a_seed_are_reproducible(client: openai.OpenAI) -> None:
    kw = dict(model="tinyrun", prompt="x = ", max_tokens=12, temperature=1.0, n=3)
    a = client.completions.create(**kw, seed=5, extra_body={"top_k": 50})
    b = client.completions.create(**kw, seed=5, extra_body={"top_k": 50})
    c = client.completions.create(**kw, seed=6, extra_body={"top_k": 50})
    texts = [ch.text for ch in a.choices]
    assert texts == [ch.text for ch in b.choices]
    assert len(set(texts)) == 3 and texts != [ch.text for ch in c.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]


def test_sampled_texts_equal_generate_in_a_mixed_batch(server: str, params: tuple) -> None:
    """Requests with different settings sent together (so they share decode calls) each give,
    choice by choice, what `generate` (sample.py) gives for the same seed and settings: one
    token chooser and one key rule (decode/choose.py)."""
    from gptjax import generate, get_tokenizer

    tok = get_tokenizer("byte")
    settings = [dict(temperature=1.0, top_k=50), dict(temperature=0.8, top_p=0.9),
                dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=1.0),
                dict(temperature=0.0)]
    prompt, n, new = "def g(", 2, 10
    auth = {"Authorization": f"Bearer {KEY}"}

    async def together() -> list[dict]:
        async with httpx.AsyncClient(base_url=server, headers=auth, timeout=60) as h:
            async def one(i: int, s: dict) -> dict:
                r = await h.post("/v1/completions", json={
                    "prompt": prompt, "max_tokens": new, "n": n, "seed": 40 + i, **s})
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one(i, s) for i, s in enumerate(settings)))

    p, cfg = params
    for i, (s, got) in enumerate(zip(settings, asyncio.run(together()))):
        want = generate(p, cfg, [tok.encode(prompt)], max_new_tokens=new, num_samples=n,
                        seed=40 + i, eos_id=tok.eot_id, **s)
        assert [c["text"] for c in got["choices"]] == [tok.decode(w) for w in want], s


def test_stop_sequences_end_the_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tinyrun", prompt="ab", max_tokens=30, temperature=0)
    text = full.choices[0].text
    stop = text[5:7]
    cut = client.completions.create(model="tinyrun", prompt="ab", max_tokens=30, temperature=0,
                                    stop=[stop, "\x00never"])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tinyrun", prompt="ab", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_models_and_health(client: openai.OpenAI, server: str) -> None:
    m = client.models.list().data
    assert [x.id for x in m] == ["tinyrun"] and m[0].context_length == CTX
    assert httpx.get(server + "/health").json()["status"] == "ok"


@pytest.mark.slow
def test_lm_eval_scores_equal_a_forward_pass(server: str, params: tuple,
                                             tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--tasks", "serve_mc",
         "--include_path", "tests/data", "--model_args",
         f"base_url={server}/v1/completions,model=tinyrun,tokenizer_backend=remote,"
         f"tokenized_requests=True,max_length={CTX},auth_token={KEY}",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=ROOT, env=dict(env(), OPENAI_API_KEY=KEY, HF_DATASETS_CACHE=str(tmp_path / "hf")),
        capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    samples = [json.loads(line) for f in glob.glob(str(tmp_path / "out/*/samples_*.jsonl"))
               for line in open(f)]
    assert len(samples) == 4
    for s in samples:
        for args, resp in zip(s["arguments"].values(), s["filtered_resps"]):
            ctx, cont = list(args["arg_0"].encode()), list(args["arg_1"].encode())
            want = forward_logprobs(params, ctx + cont)[len(ctx) - 1:].sum()
            assert abs(float(resp[0]) - want) < 1e-4 * max(1.0, abs(want)), (args, resp, want)


def _post(url: str, body: bytes | str, key: str | None = KEY, **headers: str) -> httpx.Response:
    h = {"Content-Type": "application/json", **headers}
    if key:
        h["Authorization"] = f"Bearer {key}"
    return httpx.post(url + "/v1/completions", content=body, headers=h, timeout=30)


BAD = [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ('{"prompt": 5}', 400, "prompt"),
    ('{"prompt": ""}', 400, "prompt"),
    ('{"prompt": []}', 400, "prompt"),
    ('{"prompt": [[]]}', 400, "prompt"),
    ('{"prompt": [1, 300]}', 400, "prompt"),
    ('{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    ('{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ('{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ('{"prompt": "x", "max_tokens": 1.5}', 400, "max_tokens"),
    ('{"prompt": "%s", "max_tokens": 10}' % ("a" * 60), 400, "max_tokens"),
    ('{"prompt": "x", "n": 0}', 400, "n"),
    ('{"prompt": "x", "n": 1000}', 400, "n"),
    ('{"prompt": "x", "logprobs": 6}', 400, "logprobs"),
    ('{"prompt": "x", "logprobs": -1}', 400, "logprobs"),
    ('{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ('{"prompt": "x", "temperature": -0.5}', 400, "temperature"),
    ('{"prompt": "x", "top_p": 0}', 400, "top_p"),
    ('{"prompt": "x", "stop": 3}', 400, "stop"),
    ('{"prompt": "x", "stream": "yes"}', 400, "stream"),
    ('{"prompt": "x", "seed": -3}', 400, "seed"),
    ('{"prompt": "x", "model": "gpt-4"}', 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_openai_errors(server: str, body: str, status: int,
                                        param: str | None) -> None:
    r = _post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_key_size_limit_and_server_goes_on(server: str, client: openai.OpenAI) -> None:
    r = _post(server, '{"prompt": "x"}', key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert _post(server, '{"prompt": "x"}', key="wrong").status_code == 401
    big = json.dumps({"prompt": "x", "pad": "y" * (5 << 20)})
    r = _post(server, big)
    assert r.status_code == 400 and "over" in r.json()["error"]["message"]
    assert httpx.get(server + "/nothing").json()["error"]["code"] == "not_found"
    # A client that goes away mid-stream frees its slot.
    with httpx.stream("POST", server + "/v1/completions", headers={
            "Authorization": f"Bearer {KEY}"}, json={"prompt": "a", "max_tokens": 60,
                                                    "stream": True}) as s:
        next(s.iter_lines())
    ok = client.completions.create(model="tinyrun", prompt="x", max_tokens=4, temperature=0)
    assert len(ok.choices[0].text.encode()) <= 4
    deadline = time.time() + 10
    while (h := httpx.get(server + "/health").json())["slots_busy"] or h["waiting"]:
        assert time.time() < deadline, h
        time.sleep(0.1)


@pytest.mark.slow
def test_load_64_clients_each_answer_equals_it_alone(server: str) -> None:
    """64 concurrent clients × 4 requests: every answer arrives and equals the same request
    sent alone (greedy), so nothing is lost or mixed up between slots."""
    auth = {"Authorization": f"Bearer {KEY}"}

    def body(i: int, j: int) -> dict:
        return {"prompt": f"client {i} asks {j}: ", "max_tokens": 6, "temperature": 0,
                "logprobs": 1}

    async def clients() -> dict[tuple[int, int], dict]:
        out = {}
        async with httpx.AsyncClient(base_url=server, headers=auth, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as h:
            async def one(i: int) -> None:
                for j in range(4):
                    r = await h.post("/v1/completions", json=body(i, j))
                    assert r.status_code == 200, r.text
                    out[i, j] = r.json()["choices"][0]
            await asyncio.gather(*(one(i) for i in range(64)))
        return out

    t0 = time.time()
    together = asyncio.run(clients())
    assert len(together) == 256 and time.time() - t0 < 60
    with httpx.Client(base_url=server, headers=auth, timeout=60) as h:
        for (i, j), got in together.items():
            alone = h.post("/v1/completions", json=body(i, j)).json()["choices"][0]
            assert got["text"] == alone["text"], (i, j)
            np.testing.assert_allclose(got["logprobs"]["token_logprobs"],
                                       alone["logprobs"]["token_logprobs"], atol=1e-5)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_0(run_dir: Path) -> None:
    proc, url = start_server(run_dir, "--shutdown-timeout", "5")

    async def in_flight() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as h:
            reqs = [asyncio.create_task(h.post("/v1/completions", json={
                "prompt": "a", "max_tokens": 60, "temperature": 0})) for _ in range(4)]
            await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*reqs, return_exceptions=True)

    results = asyncio.run(in_flight())
    assert proc.wait(30) == 0
    done = [r for r in results if isinstance(r, httpx.Response)]
    assert all(r.status_code == 200 for r in done)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)


@pytest.mark.slow
def test_cli_mistakes_are_one_line_exit_2(tmp_path: Path) -> None:
    for args, message in [(["--checkpoint", str(tmp_path / "none")], "no checkpoint"),
                          (["--checkpoint", str(tmp_path), "--port", "70000"], "--port"),
                          (["--checkpoint", str(tmp_path), "--max-batch", "0"], "--max-batch")]:
        r = subprocess.run([sys.executable, "-m", "gptjax.serve", *args], cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stdout == ""
        assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr


def test_bench_serve_reports_latency_and_throughput() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gptjax.bench", "serve", "--json", "--clients", "4",
         "--requests", "2", "--prompt-len", "8", "--new-tokens", "5", "--max-batch", "2",
         "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.d_ff=64",
         "model.context_length=32", "model.local_window=8"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["completion_tokens"] == 4 * 2 * 5 and out["tokens_per_s"] > 0
    assert 0 < out["latency_p50_s"] <= out["latency_p99_s"]


def test_engine_on_a_mesh_equals_one_device(run_dir: Path) -> None:
    """--mesh: the run restored straight into its shards over 4 devices, and the engine with its
    weights and slot cache sharded (slots over data, heads over tensor), gives the tokens and
    log-probs it gives on one device."""
    import threading

    from gptjax.serve import app
    from gptjax.serve.engine import Choice, Engine, key_data

    def loaded(*flags: str) -> tuple:
        a = app.parse_args(["--checkpoint", str(run_dir), "--max-batch", "4", *flags])
        return app.load(a)

    served, none = loaded()
    params, cfg = served.base, served.cfg
    assert none is None
    sharded, mesh = loaded("--mesh", "2,1,-1")
    shards = sharded.base
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    # Restored into the training layout's shards: the heads of each qkv kernel split 4 ways.
    qkv = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(shards)
           if "qkv_kernel" in jax.tree_util.keystr(path)][0]
    assert len(qkv.sharding.device_set) == 8 and qkv.addressable_shards[0].data.shape[-2] == 1
    cfg = cfg.model

    def complete(mesh: object, params: object) -> list[tuple[list[int], list[float]]]:
        engine = Engine(params, cfg, max_batch=4, eos_id=-1, steps_per_call=3,
                        mesh=mesh)
        if mesh is not None:  # really spread: every cache array and weight over the 4 devices
            for leaf in jax.tree.leaves((engine._cache, engine.params)):
                assert len(leaf.sharding.device_set) == 8
        engine.start()
        outs: list[tuple[list[int], list[float]]] = [([], []) for _ in range(3)]
        done = threading.Semaphore(0)

        def emit_to(i: int):
            def emit(ev: object) -> None:
                outs[i][0].extend(ev.tokens)
                outs[i][1].extend(ev.logprobs)
                if ev.finish:
                    done.release()
            return emit

        for i, (prompt, temp) in enumerate((([5, 6, 7], 0.0), ([9] * 20, 1.0), ([1, 2], 0.7))):
            engine.submit(Choice(prompt, 10, emit_to(i), temperature=temp, top_k=5 * i,
                                 key_data=key_data(7, i)))
        for _ in range(3):
            assert done.acquire(timeout=120)
        engine.close()
        return outs

    alone = complete(None, params)
    shared = complete(mesh, shards)
    assert [t for t, _ in shared] == [t for t, _ in alone]
    assert all(len(t) == 10 for t, _ in alone)
    for (_, a), (_, b) in zip(alone, shared):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_dry_run_compiles_the_engine_for_a_tpu_slice(run_dir: Path, capsys) -> None:
    """python -m gptjax.serve --dry-run --topology: the run's model, the engine's programs
    compiled by XLA:TPU, the weights, the cache and each program's memory per chip."""
    from gptjax.serve import app

    code = app.main(["--dry-run", "--topology", "v5e:2x2", "--checkpoint", str(run_dir),
                     "--max-batch", "4", "--mesh", "1,1,4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "on v5e:2x2 (4 v5e chips, mesh {'data': 1, 'fsdp': 1, 'tensor': 4})" in out
    assert "KV cache" in out and "(4 slots x 64 positions)" in out
    assert "prefill (one prompt of 64 tokens" in out and "decode (4 steps of every slot" in out
    assert out.rstrip().endswith("-> fits")


@pytest.mark.parametrize(("args", "message"), [
    (["--dry-run", "--config", "default"], "--dry-run and --topology go together"),
    (["--topology", "v5e:2x2", "--config", "default"], "--dry-run and --topology go together"),
    (["--checkpoint", "x", "--config", "default"], "--config is for --dry-run"),
    (["--dry-run", "--topology", "v5e:2x2"], "give --checkpoint RUN_DIR or --config PRESET"),
    ([], "give --checkpoint RUN_DIR"),
    (["--checkpoint", "x", "--mesh", "1,2"], "want three sizes DATA,FSDP,TENSOR"),
    (["--dry-run", "--topology", "v5e:2x2", "--config", "default", "--mesh", "1,1,3"],
     "the slice has 4 v5e chips"),
    (["--dry-run", "--topology", "v5p-1024", "--config", "gpt3-175b"],
     "tensor 512 does not divide the model's 96 heads"),
])
def test_dry_run_and_mesh_flag_mistakes_are_one_line(args: list[str], message: str,
                                                     capsys) -> None:
    from gptjax.serve import app

    try:
        code = app.main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
