"""Documents → token ids and loss weights, one chunk of documents at a time. These functions
also run in the tokenizer processes, which is why a job is a plain top-level function and its
arguments: it must pickle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from gptjax.data.sources import Doc, FileUnit, file_documents
from gptjax.tokenizer import Tokenizer

# Work is handed to tokenizer processes in chunks of about this much text.
CHUNK_BYTES = 4 << 20
# Bumped when the way documents are cut into jobs changes: a build resumes only over shards whose
# jobs were cut as its own are, else it would skip other documents than those shards hold.
JOB_RULE = 1


@dataclasses.dataclass
class Encoded:
    """The tokens of a chunk of documents, with what the manifest reports about them."""

    tokens: np.ndarray
    # uint8 loss weights, one per token; None when the chunk held no prompt/completion record.
    mask: np.ndarray | None = None
    documents: int = 0
    nbytes: int = 0
    replaced: int = 0
    replaced_in: str = ""  # the first document with undecodable bytes
    source_bytes: int = 0  # the job's share of its files' sizes on disk, for the progress bar


def decode_utf8(data: bytes) -> tuple[str, int]:
    """UTF-8 text with undecodable bytes replaced by U+FFFD, and how many were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")


def _encode_documents(tok: Tokenizer, docs: Iterable[Doc]) -> Encoded:
    """Tokenizes documents, each followed by the end-of-text id; a prompt/completion document
    also gets loss weights: 0 on the prompt, 1 on the completion and its end-of-text."""
    parts, out = [], Encoded(np.zeros(0, tok.dtype))
    runs: list[int] = []  # alternating lengths of weight-0 and weight-1 runs
    completions = False
    eot = np.array([tok.eot_id], dtype=tok.dtype)
    for name, data, completion in docs:
        pieces = [data] if completion is None else [data, completion]
        texts = []
        for piece in pieces:
            out.nbytes += len(piece)
            text, bad = decode_utf8(piece)
            if bad:
                out.replaced += bad
                out.replaced_in = out.replaced_in or name
            texts.append(text)
        if not any(texts):
            continue
        # Prompt and completion are encoded apart, as a sampler encodes the prompt alone: the
        # boundary is exact, and the model learns the completion's tokens as it will meet them.
        ids = [tok.encode_array(t).astype(tok.dtype, copy=False) for t in texts]
        parts += [*ids, eot]
        prompt = len(ids[0]) if completion is not None else 0
        runs += [prompt, sum(len(i) for i in ids) + 1 - prompt]
        completions = completions or completion is not None
        out.documents += 1
    if parts:
        out.tokens = np.concatenate(parts)
    if completions:
        out.mask = np.repeat(np.tile(np.array([0, 1], np.uint8), len(runs) // 2), runs)
    return out


def _encode_files(
    tok: Tokenizer,
    units: tuple[FileUnit, ...],
    split: str,
    val_fraction: float,
    text_key: str,
    source_bytes: int = 0,
) -> Encoded:
    out = _encode_documents(tok, file_documents(units, split, val_fraction, text_key))
    out.source_bytes = source_bytes
    return out


def encode_texts(tok: Tokenizer, names: list[str], texts: list[bytes]) -> Encoded:
    """Plain-text documents; a name says where undecodable bytes were found."""
    return _encode_documents(tok, ((name, text, None) for name, text in zip(names, texts)))


# Set once per tokenizer process, so jobs need not pickle the tokenizer (BPE ranks) each time.
_WORKER_TOKENIZER: Tokenizer | None = None


def init_worker(tok: Tokenizer) -> None:
    """The initializer of each tokenizer process."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def run_in_worker(fn: Callable[..., Encoded], args: tuple) -> Encoded:
    """Runs a job in a tokenizer process, with the tokenizer `init_worker` left there."""
    return fn(_WORKER_TOKENIZER, *args)


# A job: a function of this module and its arguments after the tokenizer.
Job = tuple[Callable[..., Encoded], tuple]


def file_jobs(
    units: Iterable[FileUnit], split: str, val_fraction: float, text_key: str
) -> Iterator[Job]:
    """Jobs of about CHUNK_BYTES of text each, so that no job (and no worker's memory) holds more
    than that whatever the file sizes. Small files are grouped and read by the worker. A Parquet
    file is cut by row groups. Any other file bigger than a job (a .jsonl.zst, an Arrow file) is
    streamed here and its documents are cut into jobs; only a single document (a .txt file is
    one) can exceed a job."""
    chunk: list[FileUnit] = []
    size = weight = 0
    for u in units:
        if u.format != "parquet" and _text_bytes(u) > CHUNK_BYTES:
            if chunk:
                yield _encode_files, (tuple(chunk), split, val_fraction, text_key, weight)
                chunk, size, weight = [], 0, 0
            yield from _streamed_jobs(u, split, val_fraction, text_key)
            continue
        for part, text, share in parquet_parts(u) if u.format == "parquet" else [(u, u.size,
                                                                                    u.size)]:
            chunk.append(part)
            size, weight = size + text, weight + share
            if size >= CHUNK_BYTES:
                yield _encode_files, (tuple(chunk), split, val_fraction, text_key, weight)
                chunk, size, weight = [], 0, 0
    if chunk:
        yield _encode_files, (tuple(chunk), split, val_fraction, text_key, weight)


def _text_bytes(u: FileUnit) -> int:
    """About how much text a file holds: compressed files a few times their size."""
    return u.size * (4 if u.path.endswith((".gz", ".zst")) else 1)


def _streamed_jobs(u: FileUnit, split: str, val_fraction: float, text_key: str
                   ) -> Iterator[Job]:
    """Jobs of about CHUNK_BYTES of one big file's documents, read here; the file's size counts
    toward the progress bar with its last job."""
    docs: list[Doc] = []
    size = 0
    for doc in file_documents((u,), split, val_fraction, text_key):
        docs.append(doc)
        size += len(doc[1]) + len(doc[2] or b"")
        if size >= CHUNK_BYTES:
            yield _encode_docs, (docs, 0)
            docs, size = [], 0
    yield _encode_docs, (docs, u.size)


def _encode_docs(tok: Tokenizer, docs: list[Doc], source_bytes: int) -> Encoded:
    out = _encode_documents(tok, docs)
    out.source_bytes = source_bytes
    return out


def parquet_parts(u: FileUnit) -> list[tuple[FileUnit, int, int]]:
    """A Parquet file as slices of consecutive row groups of about CHUNK_BYTES of uncompressed
    data each (by the footer's sizes), each with that size and its share of the file's size on
    disk; the file whole when its footer cannot be read (the job then says why)."""
    import pyarrow.parquet as pq  # the data extra

    try:
        meta = pq.ParquetFile(u.path).metadata
    except (OSError, ValueError):
        return [(u, u.size, u.size)]
    total = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)) or 1
    parts, start, first_row, rows, size, shared = [], 0, 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        rows, size = rows + rg.num_rows, size + rg.total_byte_size
        if size >= CHUNK_BYTES or g == meta.num_row_groups - 1:
            # The last part takes the rounding, so the shares add up to the file's size.
            share = u.size - shared if g == meta.num_row_groups - 1 else u.size * size // total
            whole = start == 0 and g == meta.num_row_groups - 1
            part = u if whole else dataclasses.replace(u, groups=(start, g + 1),
                                                       first_row=first_row)
            parts.append((part, size, share))
            start, first_row, rows, size, shared = g + 1, first_row + rows, 0, 0, shared + share
    return parts or [(u, u.size, u.size)]


def text_jobs(docs: Iterable[tuple[str, bytes]]) -> Iterator[Job]:
    """Jobs of about CHUNK_BYTES of (name, text) documents each."""
    names: list[str] = []
    texts: list[bytes] = []
    size = 0
    for name, text in docs:
        names.append(name)
        texts.append(text)
        size += len(text)
        if size >= CHUNK_BYTES:
            yield encode_texts, (names, texts)
            names, texts, size = [], [], 0
    if texts:
        yield encode_texts, (names, texts)
