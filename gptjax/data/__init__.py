"""Sources → token cache → tf.data sliding windows → batches of this process's rows.

The public names of the data pipeline, re-exported from the modules that define them.
"""

from gptjax.data.batches import TrainIterator, eval_batches, num_windows, permute
from gptjax.data.cache import (
    SPLITS,
    ensure_cache,
    load_mask,
    load_split,
    load_tokens,
    num_workers,
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
