"""``tunekit finetune CONFIG --preview-data``: what the model will see, without loading the model.

Prints the data statistics (rows used, bad rows by reason, tokens, tokens in the
loss, truncation), then the first examples decoded, with the part the loss is
computed on between ``⟦`` and ``⟧`` (a classification example shows its label,
a seq2seq example its target), the token counts of each, the length spread of
all rows and, with packing, how examples fill the packed rows. Only the
tokenizer loads (as ``axolotl preprocess --debug`` and LLaMA-Factory's printed
example do).
"""

from __future__ import annotations

from statistics import median

from tunekit.data.formats import IGNORE_INDEX

__all__ = ["preview_data", "render_example"]

OPEN, CLOSE = "⟦", "⟧"


def _segments(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The decoded text with each run of trained tokens wrapped in ⟦ ⟧ (label t is predicted from < t)."""
    out, run, trained = [], [], None
    for i, token in enumerate(ids):
        learned = i > 0 and labels[i] != IGNORE_INDEX
        if trained is not None and learned != trained:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{OPEN}{text}{CLOSE}" if trained else text)
            run = []
        run.append(token)
        trained = learned
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        out.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(out)


def render_example(tokenizer, row: dict, task: str, label_names: list[str] | None = None) -> str:
    """One stored row as text: the trained part marked (causal LM), the label or the target shown."""
    ids = row["input_ids"]
    if task == "seq_cls":
        name = label_names[row["labels"]] if label_names else row["labels"]
        return f"{tokenizer.decode(ids, skip_special_tokens=False)}\n  -> label {name!r}"
    if task == "seq2seq":
        target = tokenizer.decode(row["labels"], skip_special_tokens=False)
        return f"{tokenizer.decode(ids, skip_special_tokens=False)}\n  -> target {OPEN}{target}{CLOSE}"
    return _segments(tokenizer, ids, row["labels"])


def _examples_of(row: dict) -> list[dict]:
    """A packed row split back into its examples (positions restart at 0); an unpacked row as it is."""
    positions = row.get("position_ids")
    if positions is None:
        return [row]
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [{k: row[k][a:b] for k in ("input_ids", "labels")} for a, b in zip(starts, starts[1:])]


def _layout(bundle, max_seq_len: int) -> list[str]:
    lengths = bundle.train.lengths()
    lines = [f"rows: {len(lengths)}; tokens per row min {min(lengths)}, median {median(lengths):g}, "
             f"max {max(lengths)} (max_seq_len {max_seq_len})"]
    if bundle.stats.train.packed_rows is not None:
        fill = sum(lengths) / (len(lengths) * max_seq_len)
        lines.append(f"packing: {bundle.stats.train.rows_used} examples in {len(lengths)} rows of up to "
                     f"{max_seq_len} tokens ({fill:.0%} full)")
        for i in range(min(3, len(lengths))):
            sizes = [len(e["input_ids"]) for e in _examples_of(bundle.train[i])]
            lines.append(f"  row {i + 1}: {' + '.join(map(str, sizes))} = {sum(sizes)} tokens")
    return lines


def preview_data(cfg, rows: int = 3) -> str:
    """The preview of a run config's training data (a ``FinetuneConfig``), as printed by ``--preview-data``."""
    from tunekit.data import build_dataset
    from tunekit.data.limits import check_position_limit
    from tunekit.models import load_tokenizer

    check_position_limit(cfg)  # the same max_seq_len training will use
    tokenizer = load_tokenizer(cfg.model)
    bundle = build_dataset(cfg.data, tokenizer, seed=cfg.train.seed)
    lines = [bundle.stats.summary(), *_layout(bundle, cfg.data.max_seq_len), ""]
    examples = [e for i in range(len(bundle.train)) for e in _examples_of(bundle.train[i])][:rows] \
        if bundle.stats.train.packed_rows is not None else [bundle.train[i] for i in range(min(rows, len(bundle.train)))]
    marker = f"; the loss is on the text between {OPEN} {CLOSE}" if bundle.task == "causal_lm" else ""
    for n, row in enumerate(examples, 1):
        in_loss = sum(label != IGNORE_INDEX for label in row["labels"][1:]) if bundle.task == "causal_lm" else None
        counts = f"{len(row['input_ids'])} tokens" + (f", {in_loss} in the loss" if in_loss is not None else "")
        lines += [f"--- example {n} ({counts}{marker})", render_example(tokenizer, row, bundle.task,
                                                                         bundle.label_names)]
    return "\n".join(lines)
