"""Prefix tuning / P-tuning v2: trained key/value prefixes in every attention layer."""

from tunekit.adapters.prefix.config import PrefixConfig
from tunekit.adapters.prefix.encoder import PrefixEncoder
from tunekit.adapters.prefix.host import VirtualTokenHost
from tunekit.adapters.prefix.method import PrefixHost, PrefixMethod, fold_prefix
from tunekit.adapters.registry import register_method

register_method(PrefixMethod())

__all__ = ["PrefixConfig", "PrefixEncoder", "PrefixHost", "PrefixMethod", "VirtualTokenHost", "fold_prefix"]
