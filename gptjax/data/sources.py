"""Where documents come from: the standard library's sources, globs of text, JSON-lines,
Parquet and Arrow files (gzip or zstd compressed where it says so), and prepared TFDS datasets,
each read as a stream of documents: a Parquet file row group by row group, a compressed file
as it decompresses, never a whole file of records in memory.

A text file's split (train or validation) is decided by a hash of its stable name; a record's
(a .jsonl line, a Parquet or Arrow row) by a hash of its document id where it has one (an `id`
field, as FineWeb's), else of its file's name and row number. So no split depends on the seed,
on where the corpus lies, or on its format.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from etils import epath

from gptjax.data.readers import open_file, zstd_errors
from gptjax.errors import UserError, refused

PROMPT_KEY, COMPLETION_KEY = "prompt", "completion"


class DataError(UserError):
    """Bad data input (unknown source, empty glob, too few tokens, ...); one-line message."""


@dataclasses.dataclass(frozen=True)
class FileUnit:
    """One file of a stdlib/files source; `key` (a stable relative name) decides its split."""

    key: str
    path: str
    size: int
    mtime_ns: int
    # A slice of a Parquet file, so one file's row groups spread over jobs: groups [a, b), and
    # the rows before group a (rows are numbered over the whole file).
    groups: tuple[int, int] | None = None
    first_row: int = 0

    @property
    def format(self) -> str:
        """text | jsonl | parquet | arrow (by the name, compression suffix aside)."""
        name = re.sub(r"\.(gz|zst)$", "", self.path)
        for fmt, ext in (("jsonl", ".jsonl"), ("parquet", ".parquet"), ("arrow", ".arrow")):
            if name.endswith(ext):
                return fmt
        return "text"

    @property
    def records(self) -> bool:
        """A file of records, each a document split on its own (not the file as one)."""
        return self.format != "text"


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic, seed-independent split: the first 8 bytes of sha256(key) as a uniform draw."""
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return draw < fraction * 2.0**64


def stdlib_files() -> list[tuple[str, Path]]:
    """Every `.py` file of the running interpreter's standard library (not site-packages), as
    (path relative to the stdlib root, path), sorted by the relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                out.append((path.relative_to(root).as_posix(), path))
    out.sort()
    return out


def stat_units(pairs: Iterable[tuple[str, Path | str]]) -> list[FileUnit]:
    units = []
    for key, path in pairs:
        st = os.stat(path)
        units.append(FileUnit(key, str(path), st.st_size, st.st_mtime_ns))
    return units


def _looks_like_path(pattern: str) -> bool:
    return any(c in pattern for c in "/\\*?[~") or bool(re.search(r"\.\w+$", pattern))


def glob_units(source: str) -> list[FileUnit]:
    patterns = [p.strip() for p in source.split(",") if p.strip()]
    if not patterns or not all(_looks_like_path(p) for p in patterns):
        raise DataError(
            f"unknown data.source={source!r} (use stdlib, tfds:NAME[/CONFIG][:VERSION], or "
            "comma-separated globs of .txt/.jsonl/.parquet files or datasets directories, "
            ".gz and .zst accepted)"
        )
    found: dict[str, str] = {}  # path -> key
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(f for m in glob.glob(pattern, recursive=True) for f in _files_of(m))
        if not matches:
            raise DataError(f"data.source: {pattern!r} matches no files")
        # Keys are relative to the pattern's fixed leading directories, so a file's split does
        # not change when the corpus moves.
        fixed = []
        for part in Path(pattern).parts[:-1]:
            if any(c in part for c in "*?["):
                break
            fixed.append(part)
        base = os.path.join(*fixed) if fixed else "."
        for m in matches:
            found.setdefault(m, Path(os.path.relpath(m, base)).as_posix())
    return sorted(
        stat_units((key, path) for path, key in found.items()), key=lambda u: (u.key, u.path)
    )


def _files_of(match: str) -> list[str]:
    """A file; or a directory written by Hugging Face `datasets.save_to_disk` (state.json lists
    its Arrow files); else nothing."""
    if os.path.isfile(match):
        return [match]
    state = os.path.join(match, "state.json")
    if not os.path.isfile(state):
        return []
    try:
        files = [f["filename"] for f in json.loads(Path(state).read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{state}: not a datasets save_to_disk state file") from None
    out = [os.path.join(match, f) for f in files]
    for f in out:
        if not os.path.isfile(f):
            raise DataError(f"{match}: {os.path.basename(f)}, listed in state.json, is missing")
    return out


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    name: str
    config: str
    version: str
    data_dir: str

    @property
    def display(self) -> str:
        return self.name + (f"/{self.config}" if self.config else "")


def parse_tfds(source: str, data_dir: str) -> TfdsSpec:
    body = source[len("tfds:") :]
    name_config, _, version = body.partition(":")
    name, _, config = name_config.partition("/")
    if not re.fullmatch(r"[a-z0-9_]+", name) or (config and "/" in config):
        raise DataError(f"data.source={source!r} is not of the form tfds:NAME[/CONFIG][:VERSION]")
    if version and not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise DataError(f"data.source={source!r}: the version must look like 1.2.3")
    if not data_dir:
        data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
    if "://" not in data_dir:
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    return TfdsSpec(name, config, version, data_dir)


def tfds_builder_dir(spec: TfdsSpec) -> Any:
    """The prepared dataset's directory (`DATA_DIR/NAME[/CONFIG]/VERSION`), found by listing only:
    nothing here may touch the network, so an unprepared dataset fails at once."""

    def versions(d: Any) -> list[str]:
        if not d.is_dir():
            return []
        found = [
            p.name
            for p in d.iterdir()
            if re.fullmatch(r"\d+\.\d+\.\d+", p.name) and (p / "dataset_info.json").exists()
        ]
        return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))

    base = epath.Path(spec.data_dir) / spec.name
    config = spec.config
    if config:
        base = base / config
    elif not versions(base) and base.is_dir():
        # NAME without CONFIG for a dataset with configs (c4 → c4/en/3.0.1): take the only one.
        configs = sorted(p.name for p in base.iterdir() if p.is_dir() and versions(p))
        if len(configs) > 1:
            raise DataError(
                f"tfds:{spec.name} has several prepared configs under {spec.data_dir} "
                f"({', '.join(configs)}); name one, e.g. tfds:{spec.name}/{configs[0]}"
            )
        if configs:
            config, base = configs[0], base / configs[0]
    prepared = versions(base)
    if spec.version:
        if spec.version in prepared:
            return base / spec.version
        if prepared:
            raise DataError(
                f"tfds:{spec.display} version {spec.version} is not prepared under "
                f"{spec.data_dir} (prepared: {', '.join(prepared)})"
            )
    elif prepared:
        return base / prepared[-1]
    raise DataError(_tfds_missing_message(spec))


def _tfds_missing_message(spec: TfdsSpec) -> str:
    known = True
    try:
        import tensorflow_datasets as tfds  # heavy, and optional here: only names the dataset
    except ImportError:
        pass
    else:
        try:
            tfds.builder_cls(spec.name)  # the local catalog; no network for a plain name
        except tfds.core.registered.DatasetNotFoundError:
            known = False
    if not known:
        return (
            f"unknown TFDS dataset {spec.name!r}: not in the TFDS catalog and not prepared "
            f"under data.tfds_data_dir={spec.data_dir}"
        )
    return (
        f"TFDS dataset {spec.display} is not prepared under {spec.data_dir} and is never "
        f"downloaded here; prepare it where there is network (tfds build {spec.display} "
        f"--data_dir DIR) and set data.tfds_data_dir=DIR"
    )


# A document: (name, text, None) for plain text, (name, prompt, completion) for a record whose
# prompt tokens get weight 0.
Doc = tuple[str, bytes, bytes | None]


def _utf8(text: str) -> bytes:
    # JSON may hold lone surrogates; encode.decode_utf8 turns them into counted U+FFFD.
    return text.encode("utf-8", errors="surrogatepass")


def file_documents(
    units: tuple[FileUnit, ...], split: str, val_fraction: float, text_key: str
) -> Iterator[Doc]:
    """The documents of `units` in order: a text file is one document; a file of records gives
    one per record of `split` (a text, or a prompt/completion pair). A file that cannot be read
    to its end (truncated, corrupt, a missing or non-text column) is a DataError naming it."""
    for u in units:
        try:
            if not u.records:
                with open_file(u.path) as f:
                    yield u.key, f.read(), None
                continue
            for row, record in _rows(u, text_key):
                doc_id = record.get("id")
                key = f"id:{doc_id}" if doc_id is not None else f"{u.key}:{row}"
                if in_validation(key, val_fraction) == (split == "validation"):
                    yield _document(u, row, record, text_key)
        except DataError:
            raise
        except (OSError, EOFError, ValueError, zlib.error, *zstd_errors()) as e:  # arrow's too
            raise DataError(f"{u.path}: unreadable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else 'truncated'})") from None


def _document(u: FileUnit, row: int, record: dict[str, Any], text_key: str) -> Doc:
    where = f"{u.path}:{row}"
    # Both keys make a fine-tuning record, whatever else it holds (a "text" copy, say).
    if record.get(PROMPT_KEY) is not None and record.get(COMPLETION_KEY) is not None:
        prompt, completion = record[PROMPT_KEY], record[COMPLETION_KEY]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: {PROMPT_KEY!r} and {COMPLETION_KEY!r} must both be strings")
        return f"{u.key}:{row}", _utf8(prompt), _utf8(completion)
    if isinstance(record.get(text_key), str):
        return f"{u.key}:{row}", _utf8(record[text_key]), None
    raise DataError(f"{where}: no string field {text_key!r} (data.text_key), nor "
                    f"{PROMPT_KEY!r} and {COMPLETION_KEY!r}")


def _rows(u: FileUnit, text_key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row, record) of a file of records, streamed."""
    if u.format == "jsonl":
        with open_file(u.path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise DataError(f"{u.path}:{i}: not valid JSON") from None
                if not isinstance(record, dict):
                    raise DataError(f"{u.path}:{i}: not a JSON object")
                yield i, record
        return
    yield from _table_rows(u, text_key)


TABLE_COLUMNS = ("id", PROMPT_KEY, COMPLETION_KEY)


def _table_rows(u: FileUnit, text_key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a Parquet file (row group by row group) or an Arrow stream file (batch by batch,
    datasets' format), with only the columns a document needs."""
    import pyarrow as pa  # the data extra
    import pyarrow.parquet as pq

    if u.format == "parquet":
        pf = pq.ParquetFile(u.path)
        schema = pf.schema_arrow
        cols = _columns(u, schema, text_key)
        first, end = u.groups or (0, pf.num_row_groups)
        batches = (b for g in range(first, end)
                   for b in pf.iter_batches(row_groups=[g], columns=cols, batch_size=4096))
    else:
        reader = pa.ipc.open_stream(pa.memory_map(u.path))
        cols = _columns(u, reader.schema, text_key)
        batches = (b.select(cols) for b in reader)
    row = u.first_row
    for batch in batches:
        columns = {name: batch.column(name).to_pylist() for name in cols}
        for i in range(batch.num_rows):
            row += 1
            yield row, {name: values[i] for name, values in columns.items()}


def _columns(u: FileUnit, schema: Any, text_key: str) -> list[str]:
    import pyarrow as pa

    names = set(schema.names)
    text_cols = [c for c in (text_key, PROMPT_KEY, COMPLETION_KEY) if c in names]
    if text_key not in names and not {PROMPT_KEY, COMPLETION_KEY} <= names:
        raise DataError(f"{u.path}: no column {text_key!r} (data.text_key), nor {PROMPT_KEY!r} "
                        f"and {COMPLETION_KEY!r}; it has {', '.join(schema.names)}")
    for c in text_cols:
        t = schema.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(f"{u.path}: column {c!r} is {t}, not text")
    return [c for c in (text_key, *TABLE_COLUMNS) if c in names]


def import_tf() -> Any:
    """TensorFlow for tf.data only: quiet, and kept off any GPU that JAX owns."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # tf.data does no float math here; this also silences TF's oneDNN banner on import.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    # TensorFlow's import also loads Keras's optimizers, for a registry tf.data never reads:
    # 1.4 s of every training process's start. Hidden from it, as an absent Keras would be.
    try:
        with refused("keras.src.optimizers"):
            import tensorflow as tf  # heavy: only tf.data users and TFDS sources load it
    except ImportError:
        raise DataError(
            "tensorflow is needed for tf.data and TFDS: pip install tensorflow-cpu"
        ) from None
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # already initialized: the caller did it
    return tf


def tfds_documents(
    builder_dir: str, tfds_split: str, text_key: str, *, source: str, split: str, progress: Any
) -> Iterator[tuple[str, bytes]]:
    """(name, text) of every example of a prepared TFDS split, in order; `progress` (a tqdm bar)
    gets the split's size as its total when it is known."""
    import_tf()
    import tensorflow_datasets as tfds  # heavy (it loads TensorFlow): only for tfds: sources

    builder = tfds.builder_from_directory(builder_dir)
    splits = builder.info.splits
    base = re.split(r"[\[+]", tfds_split, maxsplit=1)[0]
    if base not in splits:
        key = "data.train_split" if split == "train" else "data.val_split"
        raise DataError(f"{key}={tfds_split!r}: {source} has splits {', '.join(sorted(splits))}")
    features = builder.info.features
    if text_key not in features:
        raise DataError(
            f"data.text_key={text_key!r}: {source} has features "
            f"{', '.join(sorted(features.keys()))}"
        )
    try:  # not reset(), which would also zero what a resumed build's bar starts from
        progress.total = splits[tfds_split].num_examples
        progress.refresh()
    except (KeyError, ValueError, TypeError, AttributeError):
        pass  # an unusual split expression: a bar without a total
    ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
    ds = ds.map(lambda ex: ex[text_key]).batch(1024).prefetch(2)
    count = 0
    for batch in ds.as_numpy_iterator():
        for text in batch:
            if not isinstance(text, bytes):
                raise DataError(f"data.text_key={text_key!r} of {source} is not text")
            yield f"{tfds_split}[{count}]", text
            count += 1
