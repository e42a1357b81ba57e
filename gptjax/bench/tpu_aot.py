"""`python -m gptjax.bench tpu-aot`: a preset's train step compiled by XLA:TPU for a Cloud TPU
slice on this host (libtpu), with XLA's memory per chip against our own estimate, for the
table in docs/tpu.md (results/tpu-aot.jsonl; gptjax/bench/tpu_aot.sh runs the whole table)."""

from __future__ import annotations

from typing import Any

from gptjax.aot import topology
from gptjax.config import load_config
from gptjax.train import dryrun


def bench_tpu_aot(config: str, slice_name: str, overrides: list[str]) -> dict[str, Any]:
    """One compile for one slice: the dry run's record with what was asked, printed as it goes."""
    cfg = load_config(config, overrides)
    target, mesh = topology.for_slice(cfg.mesh, slice_name)
    out = dryrun.dry_run(cfg, mesh, target=target)
    print(out.text, flush=True)
    m = cfg.model
    return {"config": config, "overrides": overrides, "slice": slice_name,
            "topology": target.topology, "chip": target.chip, "n_chips": target.n_chips,
            "hbm_gib": target.hbm_gib, "attention_impl": m.attention_impl,
            "batch_size": cfg.train.batch_size, "context": m.context_length, **out.record}
