"""tunekit.data: datasets -> tokenized, masked (and packed) rows for the trainer.

``build_dataset(DataConfig, tokenizer)`` returns a ``DataBundle`` (train / eval rows,
``collate``, ``train_order``, stats); ``label_names_for(cfg)`` gives a classification
config's label set before the model is loaded.
"""

from tunekit.data.build import DataBundle, DataStats, SplitStats, build_dataset, label_names_for
from tunekit.data.collate import Collator
from tunekit.data.config import DataConfig
from tunekit.data.formats import IGNORE_INDEX
from tunekit.data.packing import pack_groups, train_order
from tunekit.data.rows import TokenizedRows

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataBundle",
    "DataConfig",
    "DataStats",
    "SplitStats",
    "TokenizedRows",
    "build_dataset",
    "label_names_for",
    "pack_groups",
    "train_order",
]
