"""Prompt tuning / P-tuning v1: trained soft prompts prepended to the input embeddings."""

from tunekit.adapters.prompt.config import PromptConfig
from tunekit.adapters.prompt.encoder import PromptEncoder
from tunekit.adapters.prompt.method import PromptHost, PromptMethod
from tunekit.adapters.registry import PEFT_TYPES, register_method

_method = register_method(PromptMethod())
PEFT_TYPES["P_TUNING"] = _method  # P-tuning v1 is the same method with an encoder

__all__ = ["PromptConfig", "PromptEncoder", "PromptHost", "PromptMethod"]
