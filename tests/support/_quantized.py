"""A tiny Llama on a bitsandbytes 4-bit (nf4, double-quant) base, loaded from a folder on disk."""

from __future__ import annotations

import torch
from _tiny import tiny_llama


def save_tiny_llama(folder) -> None:
    """A Llama wide enough for bitsandbytes' CPU path (in_features >= its 64-element block)."""
    torch.manual_seed(0)
    tiny_llama(layers=2, hidden_size=64, intermediate_size=128, head_dim=16).save_pretrained(folder)


def load_4bit(folder):
    """The model in ``folder`` with every linear layer in nf4, computing in fp32, in train mode.

    Train mode keeps bitsandbytes off its eval-only CPU repack (see tests/adapters/test_qlora.py).
    """
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32).train()
