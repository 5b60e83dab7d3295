"""Per-architecture knowledge, in one table keyed by ``config.model_type``.

One row per architecture, one column group per consumer (a new concern, e.g. a
tensor-parallel plan, is one more field with a default):

- ``lora_targets``: PEFT's defaults (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
  so ``target_modules=None`` wraps what a PEFT user would get;
- placement (``attention`` ... ``cross_attention_out``): where attention and the MLP are
  inside one block, for methods that attach to sublayers (bottleneck adapters): a module
  named ``<block>.<field>`` (``blocks`` and the field both matched as regexes,
  ``re.fullmatch``) is the sublayer;
- ``virtual_tokens``: how prefix / prompt tuning feed this model (``adapters/hf/prefix_cache.py``);
- ``kernels``: the modules ``tunekit.models.apply_kernels`` swaps for kernel-backed ones.

Each row was checked against transformers 5.23's modeling code (tests/adapters/hf/test_arch_table.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class KernelModules:
    """Where the kernel-swappable modules of one architecture are, and their numerics."""

    module: str
    """transformers module defining the classes."""
    norm: str
    """RMSNorm class name."""
    mlp: str
    """Gated MLP class name (``gate_proj``/``up_proj``/``down_proj``/``act_fn``)."""
    act_key: str = "hidden_act"
    """Config field naming the MLP activation."""
    norm_offset: float = 0.0
    """1.0 where the norm computes ``x̂ · (1 + w)`` (Gemma)."""
    casting: str = "llama"
    """RMSNorm rounding order (see ``tunekit.kernels.rmsnorm_ref``)."""


def _kernels(family: str, prefix: str, **kw) -> KernelModules:
    return KernelModules(f"transformers.models.{family}.modeling_{family}", f"{prefix}RMSNorm", f"{prefix}MLP", **kw)


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
    virtual_tokens: Literal["decoder", "encoder", "encoder_decoder"] | None = None
    """How prefix / prompt tuning enter the model (None: not supported)."""
    kernels: KernelModules | None = None
    """Modules ``apply_kernels`` swaps (None: no kernel-backed modules for this architecture)."""


_DECODER = dict(attention="self_attn", attention_out="self_attn.o_proj", mlp="mlp", mlp_out="mlp.down_proj",
                blocks=r".*layers\.\d+")
_BERT_LIKE = dict(attention="attention", attention_out="attention.output.dense", mlp="intermediate",
                  mlp_out="output.dense", blocks=r".*layer\.\d+", post_norm=True, cross_attention="crossattention",
                  cross_attention_out="crossattention.output.dense", virtual_tokens="encoder")
_QV = ("q_proj", "v_proj")

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(_QV, **_DECODER, virtual_tokens="decoder", kernels=_kernels("llama", "Llama")),
    "mistral": ArchSpec(_QV, **_DECODER, virtual_tokens="decoder", kernels=_kernels("mistral", "Mistral")),
    "qwen2": ArchSpec(_QV, **_DECODER, virtual_tokens="decoder", kernels=_kernels("qwen2", "Qwen2")),
    "qwen3": ArchSpec(_QV, **_DECODER, virtual_tokens="decoder", kernels=_kernels("qwen3", "Qwen3")),
    "gemma": ArchSpec(_QV, **_DECODER, kernels=_kernels("gemma", "Gemma", norm_offset=1.0, casting="gemma")),
    # Gemma 2's hybrid sliding-window cache has no room for virtual tokens.
    "gemma2": ArchSpec(_QV, **_DECODER, kernels=_kernels("gemma2", "Gemma2", act_key="hidden_activation",
                                                         norm_offset=1.0, casting="gemma")),
    # crossattention exists only with config.add_cross_attention.
    "gpt2": ArchSpec(("c_attn",), attention="attn", attention_out="attn.c_proj", mlp="mlp", mlp_out="mlp.c_proj",
                     blocks=r".*h\.\d+", cross_attention="crossattention", cross_attention_out="crossattention.c_proj",
                     virtual_tokens="decoder"),
    "gpt_neox": ArchSpec(("query_key_value",), attention="attention", attention_out="attention.dense", mlp="mlp",
                         mlp_out="mlp.dense_4h_to_h", blocks=r".*layers\.\d+"),
    "bert": ArchSpec(("query", "value"), **_BERT_LIKE),
    "roberta": ArchSpec(("query", "value"), **_BERT_LIKE),
    # T5 blocks hold sublayer modules layer.0 (self-attn), [layer.1 (cross-attn),] layer.1|2 (FFN).
    # mlp_out is the whole FFN: its output is wo's, and T5's FFN reads wo.weight.dtype, which a
    # wrapper around wo would not have.
    "t5": ArchSpec(("q", "v"), attention=r"layer\.0\.SelfAttention", attention_out=r"layer\.0\.SelfAttention\.o",
                   mlp=r"layer\.\d+\.DenseReluDense", mlp_out=r"layer\.\d+\.DenseReluDense", blocks=r".*block\.\d+",
                   cross_attention=r"layer\.1\.EncDecAttention", cross_attention_out=r"layer\.1\.EncDecAttention\.o",
                   virtual_tokens="encoder_decoder"),
}


def supporting(column: str) -> list[str]:
    """The model types whose ``column`` is set (e.g. ``"kernels"``, ``"virtual_tokens"``)."""
    return sorted(t for t, spec in ARCHS.items() if getattr(spec, column) is not None)


def arch_column(model: nn.Module, column: str):
    """``column`` of ``model``'s row, or None (no row, or not set there)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHS.get(model_type)
    return getattr(spec, column) if spec is not None else None


def arch_spec(model: nn.Module) -> ArchSpec:
    """The table row for ``model``; a clear error for architectures not in it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(
            f"no built-in defaults for model_type {model_type!r} (known: {sorted(ARCHS)}); "
            "set target_modules explicitly"
        )
    return ARCHS[model_type]
