"""`python -m gptjax.data build --config C [section.key=value ...]`: the token cache of a config's
data section built as a step of its own (train.py would build the same one at its start): both
splits, in parallel over `data.num_workers` processes, with a progress bar (bytes, rate, ETA),
into `data.cache_dir`. A cache that already matches is kept; so building once, on one machine,
and pointing every run at the same data.cache_dir spares each of them the tokenizing."""

from __future__ import annotations

import argparse
import json

from gptjax.cli import OneLineParser, run_cli
from gptjax.config import load_config
from gptjax.data.cache import SPLITS, ensure_cache


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m gptjax.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    b = sub.add_parser("build", help="tokenize the config's data source into its token cache")
    b.add_argument("--config", default="default", help="a preset or configs/*.yaml (as train.py)")
    b.add_argument("--split", choices=(*SPLITS, "both"), default="both",
                   help="which split to build (default: both; validation only where the "
                        "source has one)")
    b.add_argument("--json", action="store_true", help="print each split's manifest as JSON")
    b.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)

    def body() -> None:
        cfg = load_config(a.config, a.overrides)
        splits = SPLITS if a.split == "both" else (a.split,)
        if a.split == "both" and cfg.data.val_fraction == 0 and \
                not cfg.data.source.startswith("tfds:"):
            splits = ("train",)  # no validation split to build
        for split in splits:
            manifest, path, built = ensure_cache(cfg, split)
            if a.json:
                print(json.dumps({"split": split, "path": str(path), "built": built,
                                  **manifest}))
            else:
                secs = manifest["build_seconds"]
                resumed = (f", resumed after {manifest['resumed_shards']} finished shard(s)"
                           if manifest["resumed_shards"] else "")
                rate = manifest["built_tokens"] / max(secs, 1e-9)
                how = (f"built in {secs:.1f} s, {rate:,.0f} tokens/s{resumed}" if built
                       else "already built")
                print(f"{split}: {manifest['tokens']:,} tokens, {manifest['documents']:,} "
                      f"documents -> {path} ({how})")

    return run_cli("python -m gptjax.data", body)
