"""The data pipeline: sources → token cache → windows → this process's rows of each batch.

GPT-3 trains on windows slid over one long token stream: documents are packed, each followed by
the end-of-text id, and nothing is masked across them. A source is tokenized once into a cache
directory (token shards per split plus a JSON manifest); training windows are then read from
memory maps in a seeded pseudo-random order that needs no buffer, so the iterator's position is
three numbers and a resumed run sees exactly the batches an uninterrupted one would.

Fine-tuning data comes as `.jsonl` records with `prompt` and `completion` strings: each becomes
the document prompt + completion + end-of-text, and a parallel uint8 loss-weight file (0 on prompt
tokens, 1 elsewhere) is cached next to the tokens, so the loss counts completion tokens only.

Each module imports only the ones before it: readers (files opened, gzip and zstd
decompressed as read), sources (where documents come from), encode (documents → tokens, also in
worker processes), integrity (checksums and the stamp that spares re-hashing), store (a local
directory or a gs:// URL; the shards read as one array), plan (what a cache holds and its
digest), shards (the resumable sharded build), cache (find, lock or wait, build), load (verified
arrays over the shards), batches (windows, their order, the iterators, each batch's ids checked
against the vocabulary), build (the `python -m gptjax.data build` command). TensorFlow loads
only where tf.data or TFDS is used, so importing this package and building the cache of a file
source need none.
"""

from gptjax.data.batches import TrainIterator, eval_batches, num_windows, permute
from gptjax.data.cache import SPLITS, ensure_cache, num_workers
from gptjax.data.integrity import CorruptCacheError
from gptjax.data.load import load_mask, load_split, load_tokens
from gptjax.data.sources import DataError, stdlib_files

__all__ = [
    "SPLITS",
    "CorruptCacheError",
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
