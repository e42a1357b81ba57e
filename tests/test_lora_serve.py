"""Several LoRA adapters over one base in one server: rows of different adapters share the
engine's batch, and each request gets the text its adapter gives alone (and sample.py's path,
generate over the LoRA run, gives); `model` picks the adapter; /v1/models lists them; an adapter
over another base, or a run that is not LoRA, is one line and exit 2."""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import pytest
from helpers import call_main, write_run
from starlette.testclient import TestClient

from gptjax import checkpoint, config, model
from gptjax.decode.generate import generate
from gptjax.lora import adapters, runs
from gptjax.serve import app as serve_app
from gptjax.serve import models
from gptjax.serve.engine import Choice, Engine, key_data
from gptjax.tokenizer import ByteTokenizer

PROMPTS = [[10, 20, 30, 40], [7, 8, 9], [100, 101, 102, 103, 104]]


def _model_cfg() -> dict:
    return {"vocab_size": 257, "context_length": 64, "n_layer": 2, "d_model": 32, "n_head": 4,
            "d_ff": 64, "local_window": 8, "vocab_multiple": 128}


def _lora_run(d: Path, base_dir: Path, base: object, rank: int, targets: list[str],
              seed: int) -> Path:
    cfg = config.config_from_dict({"model": _model_cfg(), "data": {"tokenizer": "byte"},
                                   "train": {"init_from": str(base_dir), "lora_rank": rank,
                                             "lora_alpha": 2.0 * rank, "lora_targets": targets}})
    spec = adapters.LoraSpec.of(cfg.train)
    ad = adapters.init(jax.random.key(seed), base, spec)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    ad = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.5 * jax.random.normal(next(keys), x.shape)
        if p[-1].key.endswith("_b") else x, ad)
    runs.write_run(d, cfg, ad, 5, {runs.BASE_KEY: runs.base_reference(str(base_dir), 7, base)})
    return d


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base (step 7), a (rank 4 on attention), b (rank 8 on the MLP), both over base, and
    foreign (a LoRA run over another base)."""
    root = tmp_path_factory.mktemp("lora-serve")
    cfg = config.config_from_dict({"model": _model_cfg(), "data": {"tokenizer": "byte"}})
    write_run(root / "base", cfg, step=7)
    base = checkpoint.load_params(root / "base")[0]
    _lora_run(root / "a", root / "base", base, 4, ["qkv", "out"], 1)
    _lora_run(root / "b", root / "base", base, 8, ["fc", "proj"], 2)
    write_run(root / "other", cfg, model.init_params(cfg.model, jax.random.key(5)), step=7)
    other = checkpoint.load_params(root / "other")[0]
    _lora_run(root / "foreign", root / "other", other, 4, ["qkv"], 3)
    return root


def _complete(engine: Engine, jobs: list[tuple[list[int], int, float, int]]) -> list[list[int]]:
    """Tokens of each (prompt, adapter, temperature, seed), all submitted before the engine
    starts, so the first admission takes them all into one batch (checked: every job held a
    slot at once, so they shared decode calls)."""
    out: list[list[int]] = [[] for _ in jobs]
    done = threading.Semaphore(0)
    peak = [0]

    def emit(i: int):
        def f(ev: object) -> None:
            # On the engine thread, so its slot table is current: a finishing choice's slot is
            # freed before its last event.
            peak[0] = max(peak[0], engine.busy()[0] + bool(ev.finish))
            out[i].extend(ev.tokens)
            if ev.finish:
                done.release()
        return f

    for i, (prompt, adapter, temp, seed) in enumerate(jobs):
        engine.submit(Choice(prompt, 12, emit(i), temperature=temp, top_k=20,
                             key_data=key_data(seed, 0), adapter=adapter))
    engine.start()
    for _ in jobs:
        assert done.acquire(timeout=120)
    engine.close()
    assert peak[0] == len(jobs), f"only {peak[0]} of {len(jobs)} choices were in flight at once"
    return out


def test_adapters_share_a_batch_and_match_alone(runs_dir: Path) -> None:
    served = models.load(str(runs_dir / "base"), None, None,
                         [("a", str(runs_dir / "a")), ("b", str(runs_dir / "b"))])
    assert served.names == {"base": 0, "a": 1, "b": 2}
    cfg = served.cfg.model

    def engine() -> Engine:
        return Engine(served.base, cfg, max_batch=4, eos_id=-1, steps_per_call=3,
                      adapters=served.adapters)

    jobs = [(PROMPTS[0], 1, 0.0, 0), (PROMPTS[1], 2, 0.0, 0), (PROMPTS[2], 0, 0.0, 0),
            (PROMPTS[0], 2, 1.0, 11)]
    together = _complete(engine(), jobs)
    alone = [_complete(engine(), [job])[0] for job in jobs]
    assert together == alone
    assert together[0] != _complete(engine(), [(PROMPTS[0], 0, 0.0, 0)])[0]  # adapters matter

    # sample.py's path: generate over the LoRA run as runs.load_model gives it.
    for (prompt, adapter, temp, seed), got in zip(jobs, together):
        run = {0: "base", 1: "a", 2: "b"}[adapter]
        params = runs.load_model(runs_dir / run)[0]
        want = generate(params, cfg, [prompt], max_new_tokens=12, temperature=temp, top_k=20,
                        seed=seed)[0]
        assert got == want, run


@pytest.mark.slow
def test_lora_checkpoint_params_and_mesh(runs_dir: Path) -> None:
    """A LoRA run's params as runs.load_model gives them (its base carrying its adapters) are
    the base (adapter 0) plus that adapter (1) to the engine; on a mesh, the bank replicated,
    the tokens are one device's."""
    jobs = [(PROMPTS[0], 1, 0.0, 0), (PROMPTS[1], 2, 1.0, 3), (PROMPTS[2], 0, 0.0, 0)]
    argv = ["--checkpoint", str(runs_dir / "a"), "--adapter", f"b={runs_dir / 'b'}",
            "--max-batch", "4"]
    served, _ = serve_app.load(serve_app.parse_args(argv))
    cfg = served.cfg.model

    def engine(params: object, more: list, mesh: object = None) -> Engine:
        return Engine(params, cfg, max_batch=4, eos_id=-1, steps_per_call=3, mesh=mesh,
                      adapters=more)

    want = _complete(engine(served.base, served.adapters), jobs)
    as_sampled = runs.load_model(runs_dir / "a")[0]
    assert model.LORA in as_sampled
    assert _complete(engine(as_sampled, served.adapters[1:]), jobs) == want

    sharded, mesh = serve_app.load(serve_app.parse_args([*argv, "--mesh", "2,1,-1"]))
    on_mesh = engine(sharded.base, sharded.adapters, mesh)
    assert all(len(x.sharding.device_set) == 8 and x.sharding.is_fully_replicated
               for x in jax.tree.leaves(on_mesh.bank))
    assert _complete(on_mesh, jobs) == want


def test_model_field_picks_and_models_lists(runs_dir: Path) -> None:
    served = models.load(str(runs_dir / "a"), None, None, [("b", str(runs_dir / "b"))])
    # A LoRA checkpoint: served under its name, its base too.
    assert served.default == "a" and served.names == {"base": 0, "a": 1, "b": 2}
    engine = Engine(served.base, served.cfg.model, max_batch=4, eos_id=-1,
                    adapters=served.adapters)
    engine.start()
    try:
        app = serve_app.make_app(engine, ByteTokenizer(), served.default, None, served.names,
                                 served.root)
        with TestClient(app) as client:
            listed = client.get("/v1/models").json()["data"]
            assert [m["id"] for m in listed] == ["base", "a", "b"]
            assert all(m["root"] == "base" for m in listed)
            assert [m["parent"] for m in listed] == [None, "base", "base"]

            def text(name: str | None) -> tuple[str, str]:
                body = {"prompt": "def ", "max_tokens": 8, "temperature": 0}
                if name is not None:
                    body["model"] = name
                r = client.post("/v1/completions", json=body).json()
                return r["model"], r["choices"][0]["text"]

            by_name = {n: text(n) for n in ("base", "a", "b")}
            assert {n: m for n, (m, _) in by_name.items()} == {"base": "base", "a": "a", "b": "b"}
            assert len({t for _, t in by_name.values()}) == 3  # three different models
            assert text(None) == by_name["a"]  # no `model`: the checkpoint's
            r = client.post("/v1/completions", json={"prompt": "x", "model": "c"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            assert "'base', 'a', 'b'" in r.json()["error"]["message"]
    finally:
        engine.close()


def test_adapter_refusals_are_one_line(runs_dir: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    base = ["--checkpoint", str(runs_dir / "base"), "--port", "0"]
    for extra, needle in (
            ([f"foreign={runs_dir / 'foreign'}"], "trained over another base"),
            ([f"x={runs_dir / 'other'}"], "is not a LoRA run"),
            ([f"base={runs_dir / 'a'}"], "the name 'base' is taken"),
            (["noequals"], "want NAME=RUN_DIR")):
        argv = [*base, *[w for e in extra for w in ("--adapter", e)]]
        code, _, err = call_main(serve_app.main, argv, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
