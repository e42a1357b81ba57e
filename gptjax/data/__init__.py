"""Sources → token cache → tf.data sliding windows → batches of this process's rows.

The public names of the data pipeline, re-exported from the modules that define them.
"""

from gptjax.data.cache import (
    SPLITS,
    TrainIterator,
    ensure_cache,
    eval_batches,
    load_mask,
    load_split,
    load_tokens,
    num_windows,
    num_workers,
    permute,
)
from gptjax.data.sources import DataError, stdlib_files

__all__ = [
    "SPLITS",
    "DataError",
    "TrainIterator",
    "ensure_cache",
    "eval_batches",
    "load_mask",
    "load_split",
    "load_tokens",
    "num_windows",
    "num_workers",
    "permute",
    "stdlib_files",
]
