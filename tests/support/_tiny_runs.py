"""Tiny saved models + data files + run configs for end-to-end tests of ``tunekit finetune``.

Models and the character tokenizer are written with ``save_pretrained`` so the
runs go through tunekit's real loader path (a local folder).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from _tiny import TINY_MODELS, tiny_tokenizer

# task -> (tiny model kind, data format)
TASK_MODELS = {"causal_lm": "llama", "seq_cls": "bert", "seq2seq": "t5"}

# Small adapter configs per method that fit every tiny model.
ADAPTERS = {
    "lora": {"method": "lora", "rank": 4, "alpha": 8},
    "bottleneck": {"method": "bottleneck", "hidden_size": 8},
    "prefix": {"method": "prefix", "num_virtual_tokens": 4},
    "prompt": {"method": "prompt", "num_virtual_tokens": 4},
}
HEADS = {"bert": ["classifier"], "llama": ["score"]}

_WORDS = ["red", "blue", "green", "cat", "dog", "sun", "rain", "big", "small", "fast"]


# Dropout off: full-batch training losses are then deterministic, so "loss went down" is a fair check.
_NO_DROPOUT = {"bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, "t5": {"dropout_rate": 0.0}}


def save_tiny(kind: str, folder: Path) -> Path:
    """Save tiny model ``kind`` (llama / gpt2 / bert / t5) and the char tokenizer to ``folder``."""
    TINY_MODELS[kind](**_NO_DROPOUT.get(kind, {})).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _rows(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(_WORDS, 3)
        if task == "causal_lm":
            rows.append({"instruction": f"repeat {words[0]}", "output": f"{words[0]} {words[0]}"})
        elif task == "seq_cls":
            label = "animal" if {"cat", "dog"} & set(words) else "other"
            rows.append({"text": " ".join(words), "label": label})
        else:
            rows.append({"source": " ".join(words), "target": " ".join(reversed(words))})
    return rows


def write_data(folder: Path, task: str, n_train: int = 24, n_eval: int = 8) -> tuple[Path, Path]:
    """Train and eval jsonl files for ``task`` ("causal_lm" | "seq_cls" | "seq2seq").

    The eval rows are the first training rows: a few steps on a random tiny model
    reliably fit the training data, not a held-out set, and "eval loss went down"
    is what the end-to-end tests check.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = _rows(task, n_train, seed=0)
    paths = []
    for name, part in (("train", rows), ("eval", rows[:n_eval])):
        path = folder / f"{task}_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def run_config(tmp: Path, task: str, method: str = "lora", steps: int = 4) -> dict:
    """A complete config dict for a tiny run of ``method`` on ``task`` under ``tmp``."""
    kind = TASK_MODELS[task]
    model_dir = tmp / f"tiny-{kind}"
    if not model_dir.exists():
        save_tiny(kind, model_dir)
    train, evaluation = write_data(tmp / "data", task)
    data = {"train_files": [str(train)], "eval_files": [str(evaluation)], "max_seq_len": 48}
    data.update({"causal_lm": {"format": "instruction", "prompt_template_no_input": "{prompt}: "},
                 "seq_cls": {"format": "classification", "label_field": "label"},
                 "seq2seq": {"format": "seq2seq"}}[task])
    adapter = dict(ADAPTERS[method], modules_to_save=HEADS.get(kind, []) if task == "seq_cls" else [])
    return {
        "model": {"name_or_path": str(model_dir)},
        "adapter": adapter,
        "data": data,
        "train": {"max_steps": steps, "batch_size": 24, "lr": 0.01, "log_every": 1},  # full batch
        "output": {"dir": str(tmp / f"run-{task}-{method}")},
    }


def eval_reloaded(cfg: dict, adapter_dir: Path) -> dict[str, float]:
    """``Trainer.evaluate`` of the saved adapter on its recorded base, on the eval data of run config ``cfg``."""
    from tunekit.config import load_config
    from tunekit.data import build_dataset
    from tunekit.inference import load_adapted
    from tunekit.train import Trainer

    loaded = load_adapted(adapter_dir)
    resolved = load_config(cfg)
    data = build_dataset(resolved.data, loaded.tokenizer, seed=resolved.train.seed)
    return Trainer(loaded.model, data, resolved.train, adapter_dir.parent / "reload").evaluate()
