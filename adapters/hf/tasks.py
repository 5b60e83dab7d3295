"""Model tasks as transformers and PEFT name them, and transformers' label convention.

One row per task tunekit trains: the transformers Auto class that builds its head,
PEFT's ``task_type`` for it, and the HF class-name endings that mean it.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
"""Label of positions without a loss (transformers' losses and ``nn.CrossEntropyLoss`` skip it)."""


@dataclass(frozen=True)
class TaskSpec:
    auto_class: str
    """transformers Auto class that loads a model with this head."""
    peft_task_type: str
    """PEFT's ``task_type`` in ``adapter_config.json``."""
    class_suffixes: tuple[str, ...]
    """Endings of HF model class names with this head."""


TASKS: dict[str, TaskSpec] = {
    "causal_lm": TaskSpec("AutoModelForCausalLM", "CAUSAL_LM", ("ForCausalLM", "LMHeadModel")),
    "seq_cls": TaskSpec("AutoModelForSequenceClassification", "SEQ_CLS", ("ForSequenceClassification",)),
    "seq2seq": TaskSpec("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", ("ForConditionalGeneration",)),
}
