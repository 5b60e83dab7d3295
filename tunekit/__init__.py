"""tunekit: parameter-efficient fine-tuning of Hugging Face Transformers.

Importing tunekit is cheap: the trainer, data and model-loading layers load on
first use of their names (``tunekit.finetune``, ``tunekit.load_model``, ...).
"""

import logging
from importlib import import_module

__version__ = "0.1.0"


class _DropBitsandbytesKernelNotice(logging.Filter):
    """bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels`
    package (a Hub download of a CPU 4-bit GEMM) is absent, even in runs that quantize nothing; it
    then uses its own CPU code, which tunekit's QLoRA tests check. Only that one notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBitsandbytesKernelNotice())

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
    "launch": "tunekit.distributed.launch",
    "DistributedError": "tunekit.distributed.failures",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunekit' has no attribute {name!r}")
