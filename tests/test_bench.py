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
