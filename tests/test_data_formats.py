"""Real corpora's formats: Parquet (read row group by row group, with an `id` column), zstd
JSON lines and text, and directories written by Hugging Face `datasets.save_to_disk` give the
same train and validation batches as the same records in plain `.jsonl` (a record's split
follows its `id`, whatever the format); a bad file is one line naming it, with no cache left
half-written."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gptjax import data
from gptjax.config import config_from_dict
from gptjax.data import DataError, TrainIterator, eval_batches

T = 16


def _records(n: int = 80) -> list[dict[str, str]]:
    src = Path(json.__file__).read_text()
    return [{"id": f"<urn:doc:{i:04d}>", "text": src[i * 97:i * 97 + 60 + i % 40]}
            for i in range(n)]


def _cfg(tmp_path: Path, source: str) -> object:
    return config_from_dict({
        "model": {"vocab_size": 257, "context_length": T, "local_window": 8},
        "data": {"source": source, "cache_dir": str(tmp_path / "cache"), "prefetch": 2,
                 "val_fraction": 0.25}})


def _batches(cfg: object) -> tuple[list[np.ndarray], list[np.ndarray]]:
    with TrainIterator(cfg, 4, process_index=0, process_count=1) as it:
        train = [next(it)["inputs"] for _ in range(6)]
    val = [b["inputs"] for b in eval_batches(cfg, 4, process_index=0, process_count=1)]
    return train, val


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("formats")
    recs = _records()
    # The .jsonl's fields in another order, and a field the documents ignore.
    (d / "ref.jsonl").write_text("".join(json.dumps({"text": r["text"], "id": r["id"],
                                                     "url": "x"}) + "\n" for r in recs))
    table = pa.table({"id": [r["id"] for r in recs], "text": [r["text"] for r in recs],
                      "score": list(range(len(recs)))})
    pq.write_table(table, d / "c.parquet", row_group_size=16)  # several row groups
    jsonl = "".join(json.dumps(r) + "\n" for r in recs).encode()
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    datasets.Dataset.from_dict({"id": table["id"].to_pylist(),
                                "text": table["text"].to_pylist()}).save_to_disk(d / "hfds")
    (d / "doc.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"one whole document"))
    return d


@pytest.mark.parametrize("source", ["c.parquet", "c.jsonl.zst", "hfds"])
def test_formats_give_the_jsonl_batches(corpus: Path, tmp_path: Path, source: str) -> None:
    want = _batches(_cfg(tmp_path / "ref", str(corpus / "ref.jsonl")))
    got = _batches(_cfg(tmp_path / "fmt", str(corpus / source)))
    assert len(want[1]) > 0  # a validation split exists
    for a, b in zip(want[0] + want[1], got[0] + got[1]):
        np.testing.assert_array_equal(a, b)
    assert len(got[1]) == len(want[1])


def test_zstd_text_is_one_document(corpus: Path, tmp_path: Path) -> None:
    cfg = config_from_dict({
        "model": {"vocab_size": 257, "context_length": 4, "local_window": 2},
        "data": {"source": str(corpus / "doc.txt.zst"), "cache_dir": str(tmp_path / "c"),
                 "val_fraction": 1e-9}})
    tokens = data.load_tokens(cfg, "train")
    assert bytes(np.asarray(tokens[:-1], np.uint8)) == b"one whole document"


def _bad(tmp_path: Path, name: str, payload: object) -> Path:
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    path = d / name
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        pq.write_table(payload, path)
    return path


@pytest.mark.parametrize("case", ["truncated", "no_column", "not_text", "corrupt_zstd",
                                  "truncated_zstd"])
def test_bad_files_are_one_line_and_leave_no_cache(corpus: Path, tmp_path: Path,
                                                   case: str) -> None:
    whole = (corpus / "c.parquet").read_bytes()
    zst = (corpus / "c.jsonl.zst").read_bytes()
    path, needle = {
        "truncated": (lambda: _bad(tmp_path, "t.parquet", whole[: len(whole) // 2]),
                      "unreadable"),
        "no_column": (lambda: _bad(tmp_path, "n.parquet", pa.table({"body": ["a", "b"]})),
                      "no column 'text'"),
        "not_text": (lambda: _bad(tmp_path, "x.parquet", pa.table({"text": [1, 2]})),
                     "column 'text' is int64, not text"),
        "corrupt_zstd": (lambda: _bad(tmp_path, "z.jsonl.zst", b"\x28\xb5\x2f\xfd garbage"),
                         "unreadable"),
        "truncated_zstd": (lambda: _bad(tmp_path, "y.jsonl.zst", zst[: len(zst) // 2]),
                           "unreadable"),
    }[case]
    path = path()
    cfg = _cfg(tmp_path, str(path))
    with pytest.raises(DataError) as e:
        data.ensure_cache(cfg, "train")
    message = str(e.value)
    assert str(path) in message and needle in message and "\n" not in message, message
    assert not list((tmp_path / "cache").rglob("tokens.bin"))  # nothing half-written kept


def test_a_large_parquet_file_splits_over_jobs_by_row_group(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No job holds a whole large Parquet file: slices of row groups (rows still numbered over
    the file, so the split and the tokens are the whole file's)."""
    from gptjax.data import encode
    from gptjax.data.sources import glob_units

    monkeypatch.setattr(encode, "CHUNK_BYTES", 1)
    parts = encode.parquet_parts(glob_units(str(corpus / "c.parquet"))[0])
    assert [p.groups for p, _, _ in parts] == [(g, g + 1) for g in range(5)]
    assert [p.first_row for p, _, _ in parts] == [0, 16, 32, 48, 64]
    # Their shares of the file's size, for the progress bar, add up to it.
    assert sum(share for _, _, share in parts) == parts[0][0].size
    want = _batches(_cfg(tmp_path / "ref", str(corpus / "ref.jsonl")))
    got = _batches(_cfg(tmp_path / "fmt", str(corpus / "c.parquet")))
    for a, b in zip(want[0] + want[1], got[0] + got[1]):
        np.testing.assert_array_equal(a, b)


def test_data_build_command(corpus: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import call_main

    from gptjax.data.build import main

    args = ["build", f"data.source={corpus / 'c.parquet'}", f"data.cache_dir={tmp_path / 'c'}",
            "data.val_fraction=0.25", "model.context_length=16", "model.local_window=8"]
    code, out, err = call_main(main, args, capsys)
    assert code == 0, err
    assert out.count("tokens,") == 2 and out.count("tokens/s") == 2 and "already built" not in out
    code, out, _ = call_main(main, args, capsys)
    assert code == 0 and out.count("already built") == 2
    code, _, err = call_main(main, ["build", "data.source=/no/such/*.parquet"], capsys)
    assert code == 2 and "matches no files" in err and len(err.strip().splitlines()) == 1
