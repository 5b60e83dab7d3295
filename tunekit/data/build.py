"""``build_dataset``: config + tokenizer -> tokenized train/eval rows, a collate function, stats.

Pipeline::

    read rows (files / datasets)  ->  [eval_fraction split]  ->  encode per format
        -> count bad rows by reason  ->  [pack train rows]  ->  TokenizedRows + Collator + DataStats

Encoding goes through a content-keyed cache (``tunekit.data.cache``): a batched,
multi-process ``datasets.map`` on a miss, the stored arrays on a hit (a rerun, a
resume, every rank of a multi-process run).

Bad rows (missing field, empty text, unknown label, invalid JSON line, ...) are
counted and skipped, never fatal; a source that yields no usable row at all is an
error naming the source, the field settings and the reasons.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field

from pathlib import Path

from tunekit.data.cache import EncodedSplit, default_cache_dir, encode_cached, encode_rowwise
from tunekit.data.collate import Collator
from tunekit.data.config import DataConfig
from tunekit.data.formats import IGNORE_INDEX, Encoder
from tunekit.data.packing import pack_examples, train_order
from tunekit.data.rows import TokenizedRows
from tunekit.data.sources import Row, has_eval_source, read_rows, source_name, split_eval

logger = logging.getLogger("tunekit.data")


@dataclass
class SplitStats:
    """What happened to the rows of one split."""

    rows_read: int = 0
    """Rows read from the source (after ``max_rows``, after the eval split)."""
    rows_used: int = 0
    """Rows that became examples."""
    bad_rows: Counter = field(default_factory=Counter)
    """Skipped rows, counted by reason."""
    truncated: int = 0
    """Examples cut to the maximum length."""
    tokens: int = 0
    """Input tokens of all examples."""
    loss_tokens: int = 0
    """Tokens the loss is computed on (causal LM and seq2seq)."""
    packed_rows: int | None = None
    """Rows after packing (``None`` without packing)."""

    def summary(self) -> str:
        """One line for the log."""
        # classification rows have one label each, not token targets: no loss-token count then
        in_loss = f" ({self.loss_tokens} in the loss)" if self.loss_tokens else ""
        text = f"{self.rows_used}/{self.rows_read} rows used, {self.tokens} tokens{in_loss}, {self.truncated} truncated"
        if self.packed_rows is not None:
            text += f", packed into {self.packed_rows} rows"
        if self.bad_rows:
            text += "; bad rows: " + ", ".join(f"{reason}: {n}" for reason, n in self.bad_rows.most_common())
        return text


@dataclass
class DataStats:
    """Statistics of the train split and, when there is one, the eval split."""

    train: SplitStats
    eval: SplitStats | None = None

    def summary(self) -> str:
        """Lines for the log."""
        lines = [f"data train: {self.train.summary()}"]
        if self.eval is not None:
            lines.append(f"data eval: {self.eval.summary()}")
        return "\n".join(lines)


@dataclass
class DataBundle:
    """What the trainer consumes: rows, how to batch them, and in which order."""

    train: TokenizedRows
    """Tokenized training rows; ``train[i]`` is a dict of python lists."""
    eval: TokenizedRows | None
    """Tokenized evaluation rows, or ``None``."""
    collate: Collator
    """``collate(rows) -> dict[str, Tensor]``."""
    stats: DataStats
    """Rows read / used / bad by reason, truncation and token counts."""
    task: str
    """``causal_lm``, ``seq_cls`` or ``seq2seq``: which model head to train."""
    label_names: list[str] | None
    """Class names in label-id order (classification), else ``None``."""
    group_size: int | None = None
    """Length-group size used by ``train_order`` (``None``: plain shuffle)."""
    forward_kwargs: dict = field(default_factory=lambda: {"use_cache": False})
    """Extra keyword arguments for every training / eval forward. ``use_cache=False`` is required
    for packed rows: with a cache, transformers skips the packed-sequence mask."""

    def train_order(self, epoch: int, seed: int, step_rows: int | None = None) -> list[int]:
        """Indices into ``train`` for one epoch: deterministic per ``(epoch, seed)``, shuffled, or
        length-grouped when ``group_by_length`` (groups cut to a multiple of ``step_rows``, the rows
        of one optimizer step, when given). Slice batches from it; resume by skipping."""
        return train_order(self.train.lengths(), epoch, seed, group_size=self.group_size, step_rows=step_rows)


def _sort_labels(labels: set[str]) -> list[str]:
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _infer_labels(cfg: DataConfig, rows: list[Row]) -> list[str]:
    found = {str(r[cfg.label_field]) for r in rows
             if isinstance(r, dict) and r.get(cfg.label_field) is not None and str(r[cfg.label_field]).strip()}
    if not found:
        raise ValueError(f"data.label_field {cfg.label_field!r}: no labels found in {source_name(cfg, 'train')}; "
                         f"check the field name or set data.labels")
    return _sort_labels(found)


def label_names_for(cfg: DataConfig) -> list[str] | None:
    """Class names in label-id order for a classification config, else ``None``.

    Cheap enough to call before loading the model (whose head needs ``num_labels``):
    ``cfg.labels`` when set, else the sorted distinct labels of the training source
    (read without a tokenizer). ``build_dataset`` gives the same list.
    """
    if cfg.task != "seq_cls":
        return None
    if cfg.sources is not None:
        from tunekit.data.mixing import source_labels

        return source_labels(cfg)
    return cfg.labels or _infer_labels(cfg, list(read_rows(cfg, "train")))


# Fields that choose which rows are read (the rows themselves are hashed) or what happens after
# encoding: not part of the cache key, so moving a file or turning packing on reuses the encoding.
_NOT_ENCODING = {"dataset", "dataset_config", "split", "eval_split", "train_files", "eval_files", "file_format",
                 "eval_fraction", "eval_seed", "streaming", "max_rows", "packing", "group_by_length",
                 "length_group_size"}


def _encode(rows, cfg: DataConfig, encoder: Encoder, cache: Path | None, num_proc: int | None) -> EncodedSplit:
    scalar = cfg.task == "seq_cls"
    if cache is None:
        return encode_rowwise(rows, encoder, scalar_labels=scalar)
    settings = {"data": cfg.model_dump(mode="json", exclude=_NOT_ENCODING), "label2id": encoder.label2id}
    encoded, hit = encode_cached(rows, encoder, scalar_labels=scalar, settings=settings, tokenizer=encoder.tok,
                                 cache_dir=cache, num_proc=num_proc)
    logger.info("data: %s %d rows (%s)", "read the encoding of" if hit else "encoded", encoded.rows_read, cache)
    return encoded


def _store(encoded: EncodedSplit, cfg: DataConfig, stats: SplitStats, *, pack: bool) -> TokenizedRows:
    """Fill the stats from the examples and return them (packed when ``pack``)."""
    examples = encoded.examples
    stats.rows_used, stats.truncated = len(examples), encoded.truncated
    stats.tokens = int(examples.arrays("input_ids")[1][-1])
    if cfg.task == "causal_lm":  # label 0 of an example is never a target (the model shifts)
        labels, offsets = examples.arrays("labels")
        firsts = labels[offsets[:-1][offsets[:-1] < offsets[1:]]]
        stats.loss_tokens = int((labels != IGNORE_INDEX).sum() - (firsts != IGNORE_INDEX).sum())
    elif cfg.task == "seq2seq":
        stats.loss_tokens = int(examples.arrays("labels")[1][-1])
    if not pack:
        return examples
    rows = pack_examples(examples, cfg.max_seq_len)
    stats.packed_rows = len(rows)
    return rows


def _build_split(rows, which: str, cfg: DataConfig, encoder: Encoder, cache: Path | None,
                 num_proc: int | None) -> tuple[TokenizedRows, SplitStats]:
    encoded = _encode(rows, cfg, encoder, cache, num_proc)
    stats = SplitStats(rows_read=encoded.rows_read, bad_rows=encoded.bad_rows)
    if not len(encoded.examples):
        reasons = ", ".join(f"{r}: {n}" for r, n in stats.bad_rows.most_common(3)) or "no rows"
        raise ValueError(f"data: no usable rows in {source_name(cfg, which)} (format {cfg.format!r}; "
                         f"read {stats.rows_read} rows; {reasons}); check the data.*_field settings and the files")
    # Packing is for training throughput; evaluation rows stay whole (a metric_fn reads them per example).
    return _store(encoded, cfg, stats, pack=bool(cfg.packing) and which == "train"), stats


def _pad_id(tokenizer) -> int:
    # Padding is masked out of attention and loss, so falling back to EOS changes no result.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("data: the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


def collator_for(task: str, tokenizer) -> Collator:
    """The collate function of a task (``causal_lm``, ``seq_cls``, ``seq2seq``): classification rows
    follow ``tokenizer.padding_side`` (``tunekit.load_model`` sets it left for decoder classifiers),
    the others pad on the right."""
    side = getattr(tokenizer, "padding_side", "right") if task == "seq_cls" else "right"
    return Collator(_pad_id(tokenizer), task, side)


def build_dataset(cfg: DataConfig, tokenizer, *, seed: int = 0, cache: bool | str | Path = True,
                  num_proc: int | None = None) -> DataBundle:
    """Read, format, tokenize (and pack) the data of ``cfg``.

    Args:
        cfg: the ``data:`` config.
        tokenizer: a Hugging Face tokenizer (fast tokenizers for chat templates without
            ``{% generation %}`` tags).
        seed: run seed; seeds the ``eval_fraction`` split unless ``cfg.eval_seed`` is set.
        cache: keep each split's encoding in the data cache and reuse it (``tunekit.data.cache``:
            keyed by the rows, the settings and the tokenizer; safe when several processes build
            the same data at once, one encodes while the others wait): True for the default folder,
            a folder, or False to encode row by row in this process.
        num_proc: processes that encode a cache miss (default: one per 4,096 rows, at most 8).

    Returns:
        A ``DataBundle``.

    Raises:
        ValueError: no usable rows in a source (names it), no labels found, no chat template,
            a tokenizer without pad/eos token.
        FileNotFoundError: a listed file does not exist.

    The statistics (``bundle.stats.summary()``, skipped rows by reason) are logged at INFO on
    ``tunekit.data``, not shown; ``finetune`` prints them.
    """
    _pad_id(tokenizer)  # fails before reading anything
    if cfg.sources is not None:  # several sources, each with its own format and fields
        from tunekit.data.mixing import build_mixed

        folder = None if cache is False else default_cache_dir() if cache is True else Path(cache)
        return build_mixed(cfg, tokenizer, seed=seed, cache=folder, num_proc=num_proc)
    train_rows = read_rows(cfg, "train")
    eval_rows = read_rows(cfg, "eval") if has_eval_source(cfg) else None
    label_names = None
    if cfg.format == "classification":
        train_rows = list(train_rows)
        label_names = cfg.labels or _infer_labels(cfg, train_rows)
    if cfg.eval_fraction is not None:
        split_seed = seed if cfg.eval_seed is None else cfg.eval_seed
        train_rows, eval_rows = split_eval(list(train_rows), cfg.eval_fraction, split_seed)
    encoder = Encoder(cfg, tokenizer, {name: i for i, name in enumerate(label_names or [])})
    folder = None if cache is False else default_cache_dir() if cache is True else Path(cache)
    train, train_stats = _build_split(train_rows, "train", cfg, encoder, folder, num_proc)
    evaluation, eval_stats = (_build_split(eval_rows, "eval", cfg, encoder, folder, num_proc)
                              if eval_rows is not None else (None, None))
    stats = DataStats(train_stats, eval_stats)
    # Logged, not shown: the caller shows `stats.summary()` once (finetune prints it), skipped rows included.
    logger.info(stats.summary())
    return DataBundle(train=train, eval=evaluation, collate=collator_for(cfg.task, tokenizer), stats=stats,
                      task=cfg.task, label_names=label_names,
                      group_size=cfg.length_group_size if cfg.group_by_length else None)
