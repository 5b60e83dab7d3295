"""tunekit: parameter-efficient fine-tuning of Hugging Face Transformers.

Importing tunekit is cheap: the trainer, data and model-loading layers load on
first use of their names (``tunekit.finetune``, ``tunekit.load_model``, ...).
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily, PEP 562)
_LAZY = {
    "finetune": "tunekit.api",
    "FinetuneResult": "tunekit.api",
    "FinetuneConfig": "tunekit.config",
    "load_config": "tunekit.config",
    "load_model": "tunekit.models",
    "build_dataset": "tunekit.data",
    "Trainer": "tunekit.train",
    "apply_kernels": "tunekit.models.kernels",
    "push_to_hub": "tunekit.hub",
    "plot_metrics": "tunekit.plot",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunekit' has no attribute {name!r}")
