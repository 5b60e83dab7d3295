"""Loading base models and tokenizers (Hub id, local folder or ``pkg:<package>``).

``ModelConfig`` is cheap to import; the loaders (which import transformers)
load on first use of their names.
"""

from importlib import import_module

from tunekit.models.config import ModelConfig, QuantizationConfig

_LAZY = {"load_model": "tunekit.models.loading", "load_model_config": "tunekit.models.loading",
         "load_tokenizer": "tunekit.models.loading",
         "resolve_source": "tunekit.models.loading"}

__all__ = ["ModelConfig", "QuantizationConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunekit.models' has no attribute {name!r}")
