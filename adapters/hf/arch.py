"""Per-architecture knowledge, in one table keyed by ``config.model_type``.

``lora_targets`` are PEFT's defaults (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
so ``target_modules=None`` wraps what a PEFT user would get. The placement
fields say where attention and the MLP are inside one block, for methods that
attach to sublayers (bottleneck adapters): a module named ``<block>.<field>``
(``blocks`` and the field both matched as regexes, ``re.fullmatch``) is the
sublayer. Each row was checked against transformers 5.23's modeling code.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    lora_targets: tuple[str, ...]
    """Default LoRA target modules (PEFT's defaults)."""
    attention: str
    """The attention sublayer module, relative to a block (e.g. ``self_attn``; parallel adapters
    wrap it, unless ``post_norm``)."""
    attention_out: str
    """The attention output projection (serial adapters wrap it)."""
    mlp: str
    """The feed-forward sublayer module (parallel adapters wrap it, unless ``post_norm``)."""
    mlp_out: str
    """The feed-forward output projection (serial adapters wrap it)."""
    blocks: str
    """Regex for the block modules' names (``...layers.N``)."""
    post_norm: bool = False
    """Post-LN blocks (BERT, RoBERTa): the residual add and LayerNorm happen inside the module that
    owns ``attention_out`` / ``mlp_out`` (``LN(dropout(dense(h)) + input_tensor)``), so a parallel
    adapter wraps that module and adds into its residual input ``input_tensor`` (the sublayer's input)."""
    cross_attention: str | None = None
    """The cross-attention sublayer (decoders of encoder-decoder models), None where there is none."""
    cross_attention_out: str | None = None
    """The cross-attention output projection."""


_DECODER = dict(attention="self_attn", attention_out="self_attn.o_proj", mlp="mlp", mlp_out="mlp.down_proj")

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "mistral": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "qwen2": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "qwen3": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "gemma": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    "gemma2": ArchSpec(("q_proj", "v_proj"), **_DECODER, blocks=r".*layers\.\d+"),
    # crossattention exists only with config.add_cross_attention.
    "gpt2": ArchSpec(("c_attn",), attention="attn", attention_out="attn.c_proj", mlp="mlp", mlp_out="mlp.c_proj",
                     blocks=r".*h\.\d+", cross_attention="crossattention", cross_attention_out="crossattention.c_proj"),
    "gpt_neox": ArchSpec(("query_key_value",), attention="attention", attention_out="attention.dense", mlp="mlp",
                         mlp_out="mlp.dense_4h_to_h", blocks=r".*layers\.\d+"),
    "bert": ArchSpec(("query", "value"), attention="attention", attention_out="attention.output.dense",
                     mlp="intermediate", mlp_out="output.dense", blocks=r".*layer\.\d+", post_norm=True,
                     cross_attention="crossattention", cross_attention_out="crossattention.output.dense"),
    "roberta": ArchSpec(("query", "value"), attention="attention", attention_out="attention.output.dense",
                        mlp="intermediate", mlp_out="output.dense", blocks=r".*layer\.\d+", post_norm=True,
                        cross_attention="crossattention", cross_attention_out="crossattention.output.dense"),
    # T5 blocks hold sublayer modules layer.0 (self-attn), [layer.1 (cross-attn),] layer.1|2 (FFN).
    # mlp_out is the whole FFN: its output is wo's, and T5's FFN reads wo.weight.dtype, which a
    # wrapper around wo would not have.
    "t5": ArchSpec(("q", "v"), attention=r"layer\.0\.SelfAttention", attention_out=r"layer\.0\.SelfAttention\.o",
                   mlp=r"layer\.\d+\.DenseReluDense", mlp_out=r"layer\.\d+\.DenseReluDense", blocks=r".*block\.\d+",
                   cross_attention=r"layer\.1\.EncDecAttention", cross_attention_out=r"layer\.1\.EncDecAttention\.o"),
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
