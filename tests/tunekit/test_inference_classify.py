"""Prompt tuning on decoder classifiers: a row's logits do not depend on the batch it is in.

Decoder classifiers (a ``score`` head) pool the last position when the input reaches them as
embeddings, which prompt tuning always causes (transformers' ``GenericForSequenceClassification``
reads index -1 then); with right padding that is a padding position. Oracle: each row run alone,
unpadded, through the same model. Checked in training-time evaluation (the run's collate and
``Trainer.evaluate``) and in ``predict`` / ``classify``.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_runs import save_tiny
from _tolerances import FP32_EXACT, max_abs_diff

import tunekit
from tunekit.config import load_config
from tunekit.data import build_dataset
from tunekit.inference import classify, load_adapted, predict
from tunekit.train import Trainer

TEXTS = ["red cat", "a big blue dog ran", "sun", "small green rain on the hills", "fast", "cat dog sun rain"]


def _config(tmp_path, kind: str) -> dict:
    rows = "".join(f'{{"text": "{t}", "label": "{"yes" if "cat" in t else "no"}"}}\n' for t in TEXTS)
    (tmp_path / "cls.jsonl").write_text(rows, encoding="utf-8")
    return {"model": {"name_or_path": str(save_tiny(kind, tmp_path / kind))},
            "adapter": {"method": "prompt", "num_virtual_tokens": 3, "modules_to_save": ["score"]},
            "data": {"train_files": [str(tmp_path / "cls.jsonl")], "eval_files": [str(tmp_path / "cls.jsonl")],
                     "format": "classification", "label_field": "label"},
            "train": {"max_steps": 1, "batch_size": 6, "lr": 0.01},
            "output": {"dir": str(tmp_path / "run"), "eval_before": False}}


@pytest.fixture(scope="module", params=["llama", "gpt2"])  # RoPE and absolute positions
def trained(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(f"cls-{request.param}")
    cfg = _config(tmp_path, request.param)
    result = tunekit.finetune(cfg)
    return load_config(cfg), result.adapter_dir


def _alone(model, ids: list[int]) -> torch.Tensor:
    """The oracle: one row, no padding, no mask."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_eval_batches_give_each_row_its_unpadded_logits(trained, tmp_path):
    cfg, adapter = trained
    loaded = load_adapted(adapter)
    data = build_dataset(cfg.data, loaded.tokenizer)
    rows = [data.eval[i] for i in range(len(data.eval))]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # the batch needs padding
    with torch.no_grad():
        batched = loaded.model(**{k: v for k, v in data.collate(rows).items() if k != "labels"}).logits
    expected = torch.stack([_alone(loaded.model, r["input_ids"]) for r in rows])
    assert max_abs_diff(batched, expected) <= FP32_EXACT
    whole = Trainer(loaded.model, data, cfg.train.model_copy(update={"eval_batch_size": len(rows)}),
                    tmp_path / "a").evaluate()
    one_by_one = Trainer(loaded.model, data, cfg.train.model_copy(update={"eval_batch_size": 1}),
                         tmp_path / "b").evaluate()
    assert abs(whole["loss"] - one_by_one["loss"]) <= FP32_EXACT and whole["accuracy"] == one_by_one["accuracy"]


def test_predict_batches_give_each_prompt_its_unpadded_logits(trained):
    _, adapter = trained
    loaded = load_adapted(adapter)
    ids = [loaded.prompt_ids(text) for text in TEXTS]
    expected = torch.stack([_alone(loaded.model, row) for row in ids])
    assert max_abs_diff(classify(loaded, ids, batch_size=4), expected) <= FP32_EXACT
    names = loaded.model.config.id2label
    assert predict(str(adapter), TEXTS, batch_size=4) == [names[int(i)] for i in expected.argmax(-1)]
