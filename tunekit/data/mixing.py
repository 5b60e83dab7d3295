"""Several training sources in one run (``data.sources``), concatenated or interleaved.

Each source is read and encoded with its own config (``DataConfig.for_source``:
its source, format and field mapping over the run's settings), its bad rows
counted as usual. ``data.eval_fraction`` holds out that fraction of every
source (seeded), so each is represented in the evaluation. The encoded
examples are then combined:

- ``mix: concat``: every example of each source, source after source (the
  trainer shuffles them each epoch);
- ``mix: interleave``: ``datasets.interleave_datasets`` over the sources, with
  the ``weight`` of each entry as probabilities (equal without weights, which
  alternates the sources), the run seed, and ``mix_stopping``: stop when the
  first source runs out (``first_exhausted``) or when all have been seen
  (``all_exhausted``, repeating the shorter ones). The same seed gives the same
  mixture, on every run and every process.
"""

from __future__ import annotations

import logging

from tunekit.data.config import DataConfig
from tunekit.data.formats import Encoder

logger = logging.getLogger("tunekit.data")

__all__ = ["build_mixed", "mix_order"]


def mix_order(sizes: list[int], cfg: DataConfig, seed: int) -> list[tuple[int, int]]:
    """``(source, index)`` pairs of the mixture of sources with ``sizes`` examples, as ``cfg.mix`` says."""
    if cfg.mix == "concat":
        return [(s, i) for s, n in enumerate(sizes) for i in range(n)]
    import datasets

    live = [s for s, n in enumerate(sizes) if n]
    parts = [datasets.Dataset.from_dict({"source": [s] * sizes[s], "index": list(range(sizes[s]))}) for s in live]
    weights = [cfg.sources[s].weight for s in live]
    probabilities = None if weights[0] is None else [w / sum(weights) for w in weights]
    mixed = datasets.interleave_datasets(parts, probabilities=probabilities, seed=seed,
                                         stopping_strategy=cfg.mix_stopping)
    return list(zip(mixed["source"], mixed["index"]))


def _read(cfg: DataConfig, which: str, seed: int) -> list | None:
    """A source's rows of ``which`` split (after the eval_fraction hold-out), or None without one."""
    from tunekit.data.sources import has_eval_source, read_rows, split_eval

    if cfg.eval_fraction is not None:
        split_seed = seed if cfg.eval_seed is None else cfg.eval_seed
        train, held = split_eval(list(read_rows(cfg, "train")), cfg.eval_fraction, split_seed)
        return train if which == "train" else held
    if which == "eval":
        return list(read_rows(cfg, "eval")) if has_eval_source(cfg) else None
    return read_rows(cfg, "train")


def source_labels(cfg: DataConfig) -> list[str]:
    """The label set of a classification run over ``sources``: ``labels``, else those of every source."""
    from tunekit.data.build import _sort_labels
    from tunekit.data.sources import read_rows

    if cfg.labels:
        return cfg.labels
    found = set()
    for index in range(len(cfg.sources)):
        source = cfg.for_source(index)
        found |= {str(r[source.label_field]) for r in read_rows(source, "train")
                  if isinstance(r, dict) and r.get(source.label_field) is not None and str(r[source.label_field]).strip()}
    if not found:
        raise ValueError("data.sources: no labels found in any source; check label_field or set data.labels")
    return _sort_labels(found)


def _source_label(cfg: DataConfig) -> str:
    return cfg.dataset or ", ".join(cfg.train_files or [])


def _mixed_rows(per_source: list, order: list[tuple[int, int]], *, scalar_labels: bool):
    """One ``TokenizedRows`` of the examples ``order`` picks, ``(source, index)`` by pair."""
    from tunekit.data.cache import _new_rows

    mixed = _new_rows(scalar_labels)
    for s, i in order:
        row = per_source[s][i]
        del row["attention_mask"]  # derived by TokenizedRows, not stored
        mixed.append(**row)
    return mixed


def build_mixed(cfg: DataConfig, tokenizer, *, seed: int = 0, cache=None, num_proc: int | None = None):
    """``build_dataset`` for a config with ``data.sources`` (same result type and errors); each source's
    encoding goes through the data cache (``cache``: a folder, or None to encode row by row)."""
    from tunekit.data.build import DataBundle, DataStats, SplitStats, _encode, _store, collator_for
    from tunekit.data.cache import EncodedSplit

    configs = [cfg.for_source(i) for i in range(len(cfg.sources))]
    label_names = source_labels(cfg) if cfg.task == "seq_cls" else None
    label2id = {name: i for i, name in enumerate(label_names or [])}
    splits = {}
    for which in ("train", "eval"):
        combined, per_source = EncodedSplit(examples=None), []
        for index, source_cfg in enumerate(configs):
            rows = _read(source_cfg, which, seed)
            if rows is None:
                per_source.append([])
                continue
            encoded = _encode(rows, source_cfg, Encoder(source_cfg, tokenizer, label2id), cache, num_proc)
            combined.rows_read += encoded.rows_read
            combined.bad_rows.update(encoded.bad_rows)
            combined.truncated += encoded.truncated
            if which == "train" and not len(encoded.examples):
                raise ValueError(f"data.sources[{index}] ({_source_label(source_cfg)}): no usable rows "
                                 f"(format {source_cfg.format!r}; {dict(encoded.bad_rows.most_common(3))}); "
                                 "check its *_field settings")
            logger.info("data %s source %d (%s): %d examples", which, index, _source_label(source_cfg),
                        len(encoded.examples))
            per_source.append(encoded.examples)
        if which == "eval" and not any(len(e) for e in per_source):
            splits[which] = (None, None)
            continue
        order = mix_order([len(e) for e in per_source], cfg, seed) if which == "train" else \
            [(s, i) for s, e in enumerate(per_source) for i in range(len(e))]
        combined.examples = _mixed_rows(per_source, order, scalar_labels=cfg.task == "seq_cls")
        stats = SplitStats(rows_read=combined.rows_read, bad_rows=combined.bad_rows)
        # Packing is for training throughput; evaluation rows stay whole, as in build_dataset.
        splits[which] = (_store(combined, cfg, stats, pack=bool(cfg.packing) and which == "train"), stats)
    stats = DataStats(splits["train"][1], splits["eval"][1])
    logger.info(stats.summary())
    return DataBundle(train=splits["train"][0], eval=splits["eval"][0], collate=collator_for(cfg.task, tokenizer),
                      stats=stats, task=cfg.task, label_names=label_names,
                      group_size=cfg.length_group_size if cfg.group_by_length else None)
