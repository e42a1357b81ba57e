"""The benchmarks must keep running (their figures are in the README); no timing is asserted."""

import json

from gptjax import bench


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


def test_fits_reads_xla_memory_analysis() -> None:
    class Analysis:
        argument_size_in_bytes, output_size_in_bytes = 4 << 30, 4 << 30
        temp_size_in_bytes, alias_size_in_bytes = 10 << 30, 4 << 30

    class Compiled:
        def memory_analysis(self):
            return Analysis()

    # 14 GiB needed; 10% of the device is kept for what the analysis leaves out.
    assert bench._fits(Compiled(), limit=16 << 30) == (True, 14.0)
    assert bench._fits(Compiled(), limit=15 << 30) == (False, 14.0)
    assert bench._fits(Compiled(), limit=15 << 30, margin=1.0) == (True, 14.0)
    assert bench._fits(Compiled(), limit=None) == (True, 14.0)


def test_torch_comparison_runs_in_its_own_process(capsys) -> None:
    # Same shape on both sides; on CPU torch.compile builds C++ (tens of seconds).
    assert bench.main(["train", "--config", "default", "--batch", "8", "--seq", "32", "--steps",
                       "2", "--compare-torch", "model.n_layer=2", "model.d_model=32",
                       "model.n_head=2", "model.d_ff=64", "model.local_window=16",
                       "train.xla_flags=none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["torch_device"] == "cpu" and out["torch_tokens_per_s"] > 0
    assert out["speedup_vs_torch"] == out["tokens_per_s"] / out["torch_tokens_per_s"]


def test_gpu_script_runs_end_to_end_on_a_tiny_model(tmp_path) -> None:
    """bench/gpu.sh gets one try per GPU session: its plumbing is checked here, on CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # A generous budget: the script's own (450 s) is sized for a GPU, not a loaded 2-core CPU.
    env.update(SMOKE="1", BUDGET="3000", OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    r = subprocess.run(["bash", "bench/gpu.sh"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu-results.jsonl").read_text().splitlines()]
    assert not [x for x in rows if "failed" in x or "skipped" in x], rows
    train = [x for x in rows if "tokens_per_s" in x]
    assert [r["config"] for r in train] == ["gpt3-small", "gpt3-small", "gpt3-medium", "gpt3-xl",
                                            "gpt3-small"]
    assert train[1]["pattern"] == "dense" and train[1]["speedup_vs_torch"] > 0
    assert train[0]["xla_flags"] and train[-1]["xla_flags"] == ""
    decode = [x for x in rows if "tokens_per_s_b64" in x]
    assert [x["prompt_len"] for x in decode] == [32, 48]  # short text; deep into the context
    assert r.stdout.count("tok/s") == 5 and "decode" in r.stdout
