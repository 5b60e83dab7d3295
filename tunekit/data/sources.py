"""Raw rows from local files or from ``datasets.load_dataset``.

Local files are read here, row by row, instead of through ``datasets``' json/csv
builders: those stop the whole load at the first malformed line (a pyarrow
``JSON parse error``) or at a column whose type changes between rows, while
tunekit's contract is that a bad row is counted and skipped, never fatal. A
malformed row comes out as ``BadRow(reason)`` and the caller counts it.

Hub names and local dataset folders go through ``datasets.load_dataset`` (imported
on first use; importing tunekit.data stays cheap).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tunekit.data.config import DataConfig

_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "txt"}


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used, with the reason it is counted under."""

    reason: str


Row = dict | BadRow


def file_format(path: str, cfg: DataConfig) -> str:
    """The format of a local file: ``cfg.file_format``, else from its extension."""
    if cfg.file_format is not None:
        return cfg.file_format
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(f"data: cannot tell the format of {path!r} from its extension; "
                         f"set data.file_format to one of {sorted(set(_EXTENSIONS.values()))}")
    return _EXTENSIONS[suffix]


def _json_rows(path: Path) -> Iterator[Row]:
    """A JSON array of objects, or one JSON object per line."""
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            for item in json.load(f):
                yield item if isinstance(item, dict) else BadRow("not an object")
            return
        for line in f:
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                yield BadRow("invalid json")
                continue
            yield item if isinstance(item, dict) else BadRow("not an object")


def _csv_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # a dependency of datasets; loaded only for parquet files

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _txt_rows(path: Path, field: str) -> Iterator[Row]:
    # One example per line; blank lines separate paragraphs and are not rows.
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield {field: line.rstrip("\n")}


def _file_rows(path_str: str, cfg: DataConfig, key: str) -> Iterator[Row]:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.{key}: file not found: {path_str!r}")
    fmt = file_format(path_str, cfg)
    if fmt in ("json", "jsonl"):
        return _json_rows(path)
    if fmt == "csv":
        return _csv_rows(path)
    if fmt == "parquet":
        return _parquet_rows(path)
    return _txt_rows(path, cfg.text_field)


def _hub_rows(cfg: DataConfig, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split, streaming=cfg.streaming)
    except (OSError, ValueError) as err:  # not found, offline, bad split name
        raise ValueError(f"data.dataset {cfg.dataset!r} (split {split!r}) could not be loaded: {err}") from err
    return iter(ds)


def read_rows(cfg: DataConfig, which: str) -> Iterator[Row]:
    """Rows of the ``train`` or ``eval`` source (capped at ``max_rows``), before any split.

    Raises:
        FileNotFoundError: a listed file does not exist.
        ValueError: a file's format is unknown, or the dataset cannot be loaded.
    """
    if cfg.dataset is not None:
        split = cfg.split if which == "train" else cfg.eval_split
        rows = _hub_rows(cfg, split)
    else:
        key = f"{which}_files"
        paths = getattr(cfg, key)
        iters = [_file_rows(p, cfg, key) for p in paths]  # opens lazily, but checks paths now
        rows = (row for it in iters for row in it)
    return islice(rows, cfg.max_rows) if cfg.max_rows is not None else rows


def has_eval_source(cfg: DataConfig) -> bool:
    """Whether the config names a separate evaluation source."""
    return cfg.eval_files is not None or cfg.eval_split is not None


def source_name(cfg: DataConfig, which: str) -> str:
    """Human-readable name of a source, for error messages."""
    if which == "eval" and cfg.eval_fraction is not None:
        return f"the data.eval_fraction split of {source_name(cfg, 'train')}"
    if cfg.dataset is not None:
        return f"data.dataset {cfg.dataset!r} split {cfg.split if which == 'train' else cfg.eval_split!r}"
    return f"data.{which}_files {getattr(cfg, f'{which}_files')}"


def split_eval(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split rows into (train, eval) with a seeded shuffle; eval gets ``round(fraction * n)`` rows.

    The split depends only on the row count, ``fraction`` and ``seed``, so every run (and every
    rank) holds out the same rows.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    # At least one eval row, and at least one train row left (when there are two rows or more).
    n_eval = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) > 1 else 0
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in held]
    return train, [rows[i] for i in sorted(held)]
