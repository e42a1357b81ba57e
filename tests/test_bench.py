"""The benchmarks must keep running (their figures are in docs/performance.md); no timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import process_env

from gptjax.bench import cli as bench
from gptjax.bench import gpu_summary, xplane_summary


def test_attention_bench_reports_growth(capsys) -> None:
    assert bench.main(["attention", "--seqs", "64,128", "--window", "16", "--heads", "2",
                       "--head-dim", "8", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["T"] for r in out["rows"]] == [64, 128] and out["T_growth"] == 2
    assert all(r["banded_ms"] > 0 and r["dense_ms"] > 0 for r in out["rows"])


def test_train_bench_runs_a_tiny_step(capsys) -> None:
    assert bench.main(["train", "--config", "default", "--batch", "8", "--seq", "32", "--steps",
                       "1", "model.n_layer=2", "model.d_model=32", "model.n_head=2",
                       "model.d_ff=64", "model.local_window=16", "mesh.data=-1", "train.xla_flags=none",
                       "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seq"] == 32 and out["batch"] == 8 and out["tokens_per_s"] > 0
    assert out["mfu"] is None  # unknown peak on CPU: n/a, not a made-up number
    assert 4.5 < out["loss"] < 6.5  # ~ln(257) at init


def test_remat_auto_keeps_the_first_policy_that_fits(capsys) -> None:
    assert bench.main(["train", "--config", "default", "--batch", "8", "--seq", "32", "--steps",
                       "1", "--remat", "auto", "model.n_layer=2", "model.d_model=32",
                       "model.n_head=2", "model.d_ff=64", "model.local_window=16",
                       "train.xla_flags=none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # No allocator limit on CPU: the first policy, with what it needs by XLA's analysis.
    assert out["remat"] == "none" and list(out["memory_needed_gib"]) == ["none"]
    assert out["memory_needed_gib"]["none"] > 0


@pytest.mark.slow
def test_torch_comparison_runs_in_its_own_process(capsys) -> None:
    # Same shape on both sides; on CPU torch.compile builds C++ (tens of seconds).
    assert bench.main(["train", "--config", "default", "--batch", "8", "--seq", "32", "--steps",
                       "2", "--compare-torch", "model.n_layer=2", "model.d_model=32",
                       "model.n_head=2", "model.d_ff=64", "model.local_window=16",
                       "train.xla_flags=none", "--torch-modes", "default", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    runs = out["torch_runs"]
    assert [(r["peer"], r["mode"]) for r in runs] == [("nanogpt", "default"), ("hf", "default")]
    assert all(r["device"] == "cpu" and r["tokens_per_s"] > 0 for r in runs)
    assert all(isinstance(r["graph_breaks"], int) for r in runs)
    for peer in ("nanogpt", "hf"):
        assert out[f"speedup_vs_{peer}"] == out["tokens_per_s"] / out[f"torch_{peer}_tokens_per_s"]


def _smoke(script: str, out) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Runs a gptjax/bench/ GPU script with SMOKE=1 (a tiny model, on CPU) into `out`: (the finished
    process, the rows of its gpu-results.jsonl)."""
    root = Path(__file__).resolve().parent.parent
    # One device, and the suite's cheap compiles (most of these scripts' time on a CPU).
    env = process_env()
    # A generous budget: the scripts' own are sized for a GPU, not a loaded 2-core CPU.
    env.update(SMOKE="1", BUDGET="3000", OUT=str(out),
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    r = subprocess.run(["bash", script], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r, [json.loads(line) for line in (out / "gpu-results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_benchmarks_load_without_tensorflow_or_tensorboardx() -> None:
    """The GPU image has neither: every benchmark but `run` must work there as it is."""
    script = ("import sys; sys.modules['tensorflow'] = sys.modules['tensorboardX'] = None; "
              "from gptjax.bench import cli; sys.exit(cli.main(['train', '--steps', '1', '--batch', '8', "
              "'--seq', '16', 'model.n_layer=2', 'model.d_model=32', 'model.n_head=2', "
              "'model.d_ff=64', 'model.local_window=8', '--json']))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1])["tokens_per_s"] > 0


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_a_tiny_model(tmp_path) -> None:
    """gptjax/bench/gpu.sh gets one try per GPU session: its plumbing is checked here, on CPU."""
    r, rows = _smoke("gptjax/bench/gpu.sh", tmp_path)
    env_flags = process_env()["XLA_FLAGS"]  # what _smoke gives the script
    assert not [x for x in rows if "failed" in x or "skipped" in x], rows
    train = [x for x in rows if "tokens_per_s" in x and "loop_tokens_per_s" not in x]
    assert [r["config"] for r in train] == ["gpt3-small", "gpt3-small", "gpt3-medium", "gpt3-xl",
                                            "gpt3-small"]
    (run,) = [x for x in rows if "loop_tokens_per_s" in x]  # train.py's loop, real data
    assert run["steps"] == 6 and run["intervals"] == 2 and run["loop_tokens_per_s"] > 0
    assert run["pipeline"] in ("tf.data", "threads") and len(run["val_losses"]) == 2
    assert train[1]["pattern"] == "dense" and train[1]["speedup_vs_nanogpt"] > 0
    # torch uncompiled here (test_torch_comparison... runs torch.compile), both peers
    assert [(x["peer"], x["mode"]) for x in train[1]["torch_runs"]] == [("nanogpt", "eager"),
                                                                      ("hf", "eager")]
    # train.xla_flags: the defaults added to XLA_FLAGS, and none with train.xla_flags=none
    assert train[0]["xla_flags_added"] and train[-1]["xla_flags_added"] == []
    assert train[-1]["xla_flags"] == env_flags
    decode = [x for x in rows if "tokens_per_s_b64" in x]
    # short text, again with 8 steps per loop iteration; deep into the context, again asking
    # for cuDNN's step (which falls back to xla here, and says so)
    assert [(x["prompt_len"], x["unroll"]) for x in decode] == [(32, 1), (32, 8), (48, 1), (48, 1)]
    assert [x["step_attention"] for x in decode] == ["xla"] * 4
    log = (tmp_path / "gpu-bench.log").read_text()
    assert "model.decode_attention_impl=cudnn: no GPU here" in log
    first = [x for x in rows if "tokens_per_s_b1" in x]  # time to the first token
    assert len(first) == 1 and first[0]["time_to_first_token_ms_b1"] > 0
    assert all(b["decode_steps_timed"] == x["new_tokens"] - 1
               for x in decode + first for b in x["per_batch"].values())
    assert r.stdout.count("tok/s") == 6 and "as run" in r.stdout and "decode" in r.stdout
    assert "unroll 8" in r.stdout


@pytest.mark.slow
def test_profile_trace_is_summarized_by_op_class(tmp_path, capsys) -> None:
    prof = tmp_path / "prof"
    assert bench.main(["train", "--config", "default", "--batch", "8", "--seq", "32", "--steps",
                       "1", "--profile", str(prof), "model.n_layer=2", "model.d_model=32",
                       "model.n_head=2", "model.d_ff=64", "model.local_window=16",
                       "train.xla_flags=none", "--json"]) == 0
    capsys.readouterr()
    traces = list(prof.glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and (prof / "step.hlo.txt").read_text().startswith("HloModule")
    xplane_summary.main([str(traces[0]), str(prof / "step.hlo.txt"), "--top", "5"])
    out = capsys.readouterr().out
    assert out.startswith("CPU op time")
    per_class = {ln.split()[0]: float(ln.split()[1]) for ln in
                 out.split("by class:\n")[1].split("top 5")[0].splitlines()}
    assert per_class.get("matmul", 0) > 0 and "?" not in per_class, out  # every op classed


def test_xplane_summary_classes_gpu_ops() -> None:
    mod = xplane_summary
    hlo = """
%fused_computation.9 (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {
  ROOT %dot.1 = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[8,8]) -> f32[8] {
  %ynn_fusion.2 = f32[8,8]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_computation.9
  %custom-call.3 = (bf16[2,4]{1,0}, u8[0]{0}) custom-call(%a), custom_call_target="__cudnn$fmhaSoftmax"
  %gemm_fusion_dot.27 = bf16[8,8]{1,0} fusion(%x, %y), kind=kCustom, calls=%f, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  ROOT %loop_add_fusion.1 = f32[8]{0} fusion(%p), kind=kLoop, calls=%g
  %dot.4 = f32[8,8]{1,0} dot(%x, %y), lhs_contracting_dims={1}, rhs_contracting_dims={0}
"""
    c = mod.op_classes(hlo)
    assert c["custom-call.3"] == "attention" and c["gemm_fusion_dot_27"] == "matmul"
    assert c["loop_add_fusion_1"] == "fusion:kLoop" and c["dot.4"] == "matmul"
    assert c["ynn_fusion.2"] == "matmul"  # a fusion whose computation holds a product
    assert mod._kernel_class("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT") == "matmul"
    assert mod._kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert mod._kernel_class("memcpy128") == "copy" and mod._kernel_class("loop_fusion") is None


@pytest.mark.slow
def test_gpu_profile_script_runs_end_to_end_on_a_tiny_model(tmp_path) -> None:
    """gptjax/bench/gpu_profile.sh, like gpu.sh, gets one try on a GPU: its plumbing is checked
    here."""
    r, rows = _smoke("gptjax/bench/gpu_profile.sh", tmp_path)
    assert len(rows) == 8 and not [x for x in rows if "failed" in x or "skipped" in x], rows
    assert [x["remat"] for x in rows[-2:]] == ["none", "dots"]
    for name in ("small", "medium"):  # what gptjax/bench/xplane_summary.py reads back here
        assert (tmp_path / f"prof-{name}.xplane.pb.gz").stat().st_size > 0
        assert (tmp_path / f"prof-{name}.hlo.txt.gz").stat().st_size > 0
    assert r.stdout.count("tok/s") == 8


def test_gpu_summary_prints_a_line_per_row(tmp_path, capsys) -> None:
    """python -m gptjax.bench.gpu_summary, what gpu.sh ends with: failed and skipped rows as
    they were recorded, blank lines skipped; a missing argument is a usage line and status 2."""
    res = tmp_path / "gpu-results.jsonl"
    res.write_text(json.dumps({"failed": "train gpt3-xl", "rc": 137}) + "\n\n"
                   + json.dumps({"skipped": "decode"}) + "\n")
    assert gpu_summary.main([str(res)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "gpt3-xl" in out[0] and "skipped" in out[1]
    assert gpu_summary.main([]) == 2
    assert capsys.readouterr().err.startswith("usage: python -m gptjax.bench.gpu_summary")


@pytest.mark.slow
def test_decode_bench_checks_a_step_kernel_against_xla(monkeypatch) -> None:
    """With model.decode_attention_impl=cudnn the decode row carries the kernel's largest error
    against xla's step; a kernel that reads past each row's filled slots shows up in it."""
    import dataclasses

    import jax

    from gptjax.bench.decode import bench_decode, step_attention_error
    from helpers import cudnn_as_xla, tiny

    cfg = tiny(decode_attention_impl="cudnn", dtype="bfloat16")
    plain = bench_decode(dataclasses.replace(cfg, decode_attention_impl="xla"), batch_sizes=(2,),
                         max_len=16, repeats=1)
    assert "step_attention_max_error" not in plain
    asked = cudnn_as_xla(monkeypatch)
    row = bench_decode(cfg, batch_sizes=(2,), max_len=16, repeats=1)
    assert row["step_attention"] == "cudnn" and "cudnn" in asked
    assert row["step_attention_max_error"] < 2e-2  # bf16 rounding of two correct kernels
    fake = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, key_value_seq_lengths=None, **kw: fake(*a, **kw))
    assert step_attention_error(cfg, 4, 16) > 0.1


@pytest.mark.slow
def test_cache_bench_builds_kills_resumes_and_records(tmp_path) -> None:
    """`bench cache` on a tiny corpus: the build, a build killed at half its shards and
    resumed into the same cache, and the row the docs' table is made from."""
    from gptjax.bench import report
    from gptjax.data import encode, shards

    record = tmp_path / "cache.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Small jobs and shards, and slow ones, so the kill lands mid-build (in the build commands,
    # through a sitecustomize).
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import time\n"
        "from gptjax.bench import cache\n"
        "from gptjax.data import encode, shards\n"
        "cache.ROWS_PER_GROUP = 20\n"
        "encode.CHUNK_BYTES = 1 << 16\nshards.SHARD_JOBS = 2\n"
        "real = encode._encode_files\n"
        "def slow(*args):\n    time.sleep(0.01)\n    return real(*args)\n"
        "encode._encode_files = slow\n")
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "gptjax.bench", "cache", "--gb", "0.004",
                        "--tokenizers", "byte", "--workdir", str(tmp_path / "w"),
                        "--record", str(record), "--json"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(record.read_text())
    assert out["corpus"]["bytes_on_disk"] >= 0.004e9 and out["corpus"]["files"] >= 1
    [b] = out["builds"]
    assert b["tokens"] >= out["corpus"]["text_bytes"] and b["shards"] >= 4
    assert b["peak_rss_mib"] > 0 and b["resume"]["killed"]
    assert 0 < b["resume"]["resumed_shards"] < b["shards"]
    assert b["resume"]["sha256_equal"] and b["resume"]["shards_equal"]
    assert encode.CHUNK_BYTES == 4 << 20 and shards.SHARD_JOBS == 16  # not this process's
    assert report._cache_rows(out)[0][9].endswith("kept; equal")
