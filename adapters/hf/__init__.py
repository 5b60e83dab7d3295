"""Everything that knows about transformers (and bitsandbytes) module types lives here."""

from tunekit.adapters.hf.arch import ArchSpec, arch_spec
from tunekit.adapters.hf.layers import base_weight, is_linear_like, is_quantized, linear_features

__all__ = ["ArchSpec", "arch_spec", "base_weight", "is_linear_like", "is_quantized", "linear_features"]
