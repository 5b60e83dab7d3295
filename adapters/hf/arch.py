"""Per-architecture knowledge, in one table keyed by ``config.model_type``.

``lora_targets`` are PEFT's defaults (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
so ``target_modules=None`` wraps what a PEFT user would get. The placement
fields say where attention and the MLP are inside one block (module-name
suffixes), for methods that attach to sublayers (bottleneck adapters).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    lora_targets: tuple[str, ...]
    """Default LoRA target modules (PEFT's defaults)."""
    attention: str
    """The attention sublayer module, relative to a block (e.g. ``self_attn``)."""
    attention_out: str
    """The attention output projection (serial adapters wrap it)."""
    mlp: str
    """The feed-forward sublayer module (parallel adapters wrap it)."""
    mlp_out: str
    """The feed-forward output projection (serial adapters wrap it)."""
    blocks: str
    """Regex for the block modules' names (``...layers.N``)."""


_DECODER = dict(attention="self_attn", attention_out="self_attn.o_proj", mlp="mlp", mlp_out="mlp.down_proj")

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "mistral": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "qwen2": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "qwen3": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "gemma": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "gemma2": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "gpt2": ArchSpec(("c_attn",), attention="attn", attention_out="attn.c_proj", mlp="mlp", mlp_out="mlp.c_proj",
                     blocks=r".*h\.\d+"),
    "gpt_neox": ArchSpec(("query_key_value",), attention="attention", attention_out="attention.dense", mlp="mlp",
                         mlp_out="mlp.dense_4h_to_h", blocks=r".*layers\.\d+"),
    "bert": ArchSpec(("query", "value"), attention="attention", attention_out="attention.output.dense",
                     mlp="intermediate", mlp_out="output.dense", blocks=r".*layer\.\d+"),
    "roberta": ArchSpec(("query", "value"), attention="attention", attention_out="attention.output.dense",
                        mlp="intermediate", mlp_out="output.dense", blocks=r".*layer\.\d+"),
    "t5": ArchSpec(("q", "v"), attention="SelfAttention", attention_out="SelfAttention.o", mlp="DenseReluDense",
                   mlp_out="DenseReluDense.wo", blocks=r".*block\.\d+"),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The table row for ``model``; a clear error for architectures not in it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(
            f"no built-in defaults for model_type {model_type!r} (known: {sorted(ARCHS)}); "
            "set target_modules explicitly"
        )
    return ARCHS[model_type]
