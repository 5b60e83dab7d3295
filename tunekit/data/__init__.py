"""tunekit.data: datasets -> tokenized, masked (and packed) rows for the trainer.

``build_dataset(DataConfig, tokenizer)`` returns a ``DataBundle`` (train / eval rows,
``collate``, ``train_order``, stats); ``label_names_for(cfg)`` gives a classification
config's label set before the model is loaded; ``PromptRenderer`` builds prompts the way
training does, for inference.
"""

from tunekit.data.build import DataBundle, DataStats, SplitStats, build_dataset, collator_for, label_names_for
from tunekit.data.collate import Collator
from tunekit.data.config import DataConfig
from tunekit.data.formats import IGNORE_INDEX
from tunekit.data.packing import pack_groups, train_order
from tunekit.data.prompts import PromptRenderer, fill_template
from tunekit.data.rows import TokenizedRows

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataBundle",
    "DataConfig",
    "DataStats",
    "PromptRenderer",
    "SplitStats",
    "TokenizedRows",
    "build_dataset",
    "collator_for",
    "fill_template",
    "label_names_for",
    "pack_groups",
    "train_order",
]
