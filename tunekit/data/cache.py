"""Tokenizing a split once: ``datasets.map(batched=True, num_proc=...)`` behind a content-keyed cache.

Encoding rows (tokenizing, templating, masking) is the slow part of data preparation
and its result depends only on its inputs, so it is done once and kept::

    rows (as read, bad rows included) --+
    data config (but packing/grouping)  +--> key (datasets' Hasher / SHA-256)
    tokenizer (datasets' fingerprint)   |
    label ids, encoder source code   --+
                                            hit:  <cache>/<key>/ -> arrays -> TokenizedRows
                                            miss: Dataset.map(encode, batched, num_proc) -> arrays
                                                  -> written to a private folder, renamed into place

The rows themselves are hashed (not file names or dates), so a changed file, another
``max_rows`` or another ``eval_fraction`` split is another key; so is a change to the
encoding code (formats, prompts, chat templates). Each row is encoded by the same
``Encoder`` as the row-wise path, in the same order, and bad rows are counted by the
same reasons, so both paths give identical rows and statistics
(``tests/tunekit/test_data_cache.py``).

Several processes may build the same data at once (every rank of a multi-process run):
a file lock per key lets one encode while the others wait, then read what it wrote; a
folder appears under its final name only complete (``os.rename``), so a reader never sees
half of one. Nothing here needs ``torch.distributed``.

Where: ``$TUNEKIT_DATA_CACHE``, else ``$XDG_CACHE_HOME/tunekit/data`` (``~/.cache/tunekit/data``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunekit.data.chat import SkipRow
from tunekit.data.rows import TokenizedRows
from tunekit.data.sources import BadRow

__all__ = ["EncodedSplit", "default_cache_dir", "encode_cached", "encode_rowwise"]

FORMAT_VERSION = 1
_ENCODER_MODULES = ("tunekit.data.formats", "tunekit.data.prompts", "tunekit.data.chat", __name__)
# Rows below which one process encodes: a worker pool costs more than it saves on small data.
ROWS_PER_PROCESS = 4096
PROGRESS_ROWS = 20_000  # datasets' progress bar only for splits this large


@dataclass
class EncodedSplit:
    """The examples of one split before packing, and what happened to its rows."""

    examples: TokenizedRows
    """``input_ids`` and ``labels`` (ragged; a scalar ``labels`` column for classification)."""
    rows_read: int = 0
    bad_rows: Counter = field(default_factory=Counter)
    truncated: int = 0


def _new_rows(scalar_labels: bool) -> TokenizedRows:
    return TokenizedRows(("input_ids",), ("labels",)) if scalar_labels else TokenizedRows(("input_ids", "labels"))


def _encode_one(row, encoder):
    """(example, reason): exactly one of them is None."""
    if isinstance(row, BadRow):
        return None, row.reason
    try:
        return encoder(row), None
    except SkipRow as skip:
        return None, skip.args[0]


def encode_rowwise(rows, encoder, *, scalar_labels: bool) -> EncodedSplit:
    """Encode ``rows`` one by one in this process (no cache): the reference path."""
    out = EncodedSplit(_new_rows(scalar_labels))
    for row in rows:
        out.rows_read += 1
        example, reason = _encode_one(row, encoder)
        if reason is not None:
            out.bad_rows[reason] += 1
            continue
        out.truncated += example.truncated
        out.examples.append(input_ids=example.input_ids, labels=example.labels)
    return out


def _encode_batch(batch: dict, encoder) -> dict:
    """``Dataset.map`` function: pickled rows -> example columns (bad rows: empty ids and a reason)."""
    out = {"input_ids": [], "labels": [], "truncated": [], "reason": []}
    for blob in batch["row"]:
        example, reason = _encode_one(pickle.loads(blob), encoder)
        labels = [] if example is None else example.labels
        out["input_ids"].append([] if example is None else example.input_ids)
        out["labels"].append(labels if isinstance(labels, list) else [labels])
        out["truncated"].append(example is not None and example.truncated)
        out["reason"].append(reason or "")
    return out


def default_cache_dir() -> Path:
    """``$TUNEKIT_DATA_CACHE``, else ``$XDG_CACHE_HOME/tunekit/data`` (``~/.cache/tunekit/data``)."""
    if os.environ.get("TUNEKIT_DATA_CACHE"):
        return Path(os.environ["TUNEKIT_DATA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tunekit" / "data"


def _source_digest() -> str:
    import importlib

    digest = hashlib.sha256()
    for name in _ENCODER_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()


def cache_key(blobs: list[bytes], settings: dict, tokenizer) -> str:
    """The key of one split's encoding: its pickled rows, the settings that shape encoding, the tokenizer."""
    from datasets.fingerprint import Hasher

    digest = hashlib.sha256(f"tunekit-data:{FORMAT_VERSION}:{_source_digest()}".encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(Hasher.hash(tokenizer).encode())
    for blob in blobs:
        digest.update(len(blob).to_bytes(8, "little"))
        digest.update(blob)
    return digest.hexdigest()[:32]


def _procs(num_proc: int | None, rows: int) -> int:
    if num_proc is not None:
        return max(1, num_proc)
    return max(1, min(os.cpu_count() or 1, 8, rows // ROWS_PER_PROCESS))


def _map_encode(blobs: list[bytes], encoder, num_proc: int, work: Path):
    from datasets import Dataset, Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                         "truncated": Value("bool"), "reason": Value("string")})
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    data = Dataset.from_dict({"row": blobs})
    quiet = len(blobs) < PROGRESS_ROWS and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        return data.map(_encode_batch, fn_kwargs={"encoder": encoder}, batched=True, batch_size=256,
                        num_proc=num_proc if num_proc > 1 else None, remove_columns=["row"], features=features,
                        cache_file_name=str(work / "map.arrow"), new_fingerprint=work.name, desc="tokenizing")
    finally:
        if quiet:
            enable_progress_bars()


def _ragged(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    column = table.column(name).combine_chunks()  # ListArray: flat values + row offsets
    offsets = np.asarray(column.offsets, dtype=np.int64)
    values = np.asarray(column.values, dtype=np.int32)[offsets[0]: offsets[-1]]
    return values, offsets - offsets[0]


def _write_arrays(mapped, folder: Path, rows_read: int) -> None:
    """The mapped columns as arrays of the good rows (plus the counts) in ``folder``."""
    table = mapped.data.table
    reasons = table.column("reason").to_pylist()
    keep = np.array([not r for r in reasons], dtype=bool)
    ids, id_offsets = _ragged(table, "input_ids")
    labels, label_offsets = _ragged(table, "labels")
    arrays = {"input_ids": ids, "input_offsets": id_offsets[np.r_[True, keep]],
              "labels": labels, "label_offsets": label_offsets[np.r_[True, keep]]}
    # Bad rows hold no ids or labels: dropping their (empty) offsets keeps the flat values as they are.
    for name, value in arrays.items():
        np.save(folder / f"{name}.npy", value)
    truncated = int(np.asarray(table.column("truncated"), dtype=bool)[keep].sum())
    meta = {"rows_read": rows_read, "bad_rows": Counter(r for r in reasons if r), "truncated": truncated}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def _read_arrays(folder: Path, scalar_labels: bool) -> EncodedSplit:
    load = {name: np.load(folder / f"{name}.npy") for name in ("input_ids", "input_offsets", "labels",
                                                                  "label_offsets")}
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if scalar_labels:
        examples = TokenizedRows.from_arrays({"input_ids": (load["input_ids"], load["input_offsets"])},
                                             {"labels": load["labels"]})
    else:
        examples = TokenizedRows.from_arrays({"input_ids": (load["input_ids"], load["input_offsets"]),
                                              "labels": (load["labels"], load["label_offsets"])})
    return EncodedSplit(examples, meta["rows_read"], Counter(meta["bad_rows"]), meta["truncated"])


def encode_cached(rows, encoder, *, scalar_labels: bool, settings: dict, tokenizer, cache_dir: Path,
                  num_proc: int | None = None) -> tuple[EncodedSplit, bool]:
    """Encode ``rows`` through the cache: ``(split, hit)``; equal to ``encode_rowwise`` on the same rows.

    Args:
        rows: raw rows (dicts, ``BadRow``s), as ``read_rows`` gives them.
        encoder: the ``Encoder`` (picklable: worker processes receive a copy).
        scalar_labels: classification (one label id per example).
        settings: everything else encoding depends on (the data config minus packing and grouping,
            label ids, the split name): part of the key.
        tokenizer: the tokenizer (its datasets fingerprint is part of the key).
        cache_dir: the cache root.
        num_proc: encoding processes (default: one per ``ROWS_PER_PROCESS`` rows, at most 8 and the CPUs).
    """
    from filelock import FileLock

    blobs = [pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL) for row in rows]
    key = cache_key(blobs, settings, tokenizer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / key
    with FileLock(str(cache_dir / f"{key}.lock")):
        if (final / "meta.json").is_file():
            return _read_arrays(final, scalar_labels), True
        work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache_dir))
        try:
            mapped = _map_encode(blobs, encoder, _procs(num_proc, len(blobs)), work)
            ready = work / "ready"
            ready.mkdir()
            _write_arrays(mapped, ready, len(blobs))
            del mapped  # its arrow files go with the work folder
            shutil.rmtree(final, ignore_errors=True)  # a folder left without meta.json by a crash
            os.rename(ready, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return _read_arrays(final, scalar_labels), False
