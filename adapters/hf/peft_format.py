"""PEFT's on-disk conventions shared by every method that writes PEFT's format."""

from __future__ import annotations

import torch
from torch import nn

from tunekit.adapters.hf.tasks import TASKS

# PeftModel wraps the HF model twice (PeftModel.base_model = LoraModel, .model = HF model).
PEFT_PREFIX = "base_model.model."

# tunekit's tasks, then heads PEFT names that tunekit does not train (their adapters still export).
_TASK_SUFFIXES = tuple((suffix, spec.peft_task_type) for spec in TASKS.values() for suffix in spec.class_suffixes) + (
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for an HF model class (None for bare encoders)."""
    name = type(model).__name__
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return task
    return None


def strip_peft_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
