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
- ``kernels``: the modules ``tunekit.models.apply_kernels`` swaps for kernel-backed ones;
- ``tp``: how tensor parallelism splits the model (``tunekit.distributed.tp_plan``): transformers'
  own ``base_model_tp_plan`` where the config class has one, tunekit's plan otherwise.

Each row was checked against transformers 5.23's modeling code (tests/adapters/hf/test_arch_table.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
class TPPlan:
    """How tensor parallelism splits one architecture.

    Module patterns are relative to the base model (``model.base_model``); ``*`` is one
    path component (a layer index). Styles: ``colwise`` (output features split),
    ``rowwise`` (input features split, outputs summed), ``packed_colwise:N`` (N outputs
    side by side, each split colwise: GPT-2's fused q/k/v), ``embedding_colwise`` (an
    embedding's columns split: T5's per-head position bias), ``replicate`` (kept whole).
    """

    layers: Mapping[str, str] | None = None
    """Pattern -> style; None: transformers' ``base_model_tp_plan``, read from the config class."""
    local_widths: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Pattern -> integer attributes of that module that hold a per-rank width (divided by the TP
    degree), where the modeling code does not infer it from the tensors (``view(..., -1, D)``)."""
    sizes: tuple[str, ...] = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    """Config fields the TP degree must divide (absent or None fields are skipped)."""
    sequence_norms: tuple[str, ...] = ()
    """Norms on the residual stream, the last one the final norm; set where sequence parallelism is
    supported (the block's ``attention`` and ``mlp`` then gather their input)."""


_HF_DECODER_TP = TPPlan(sequence_norms=("layers.*.input_layernorm", "layers.*.post_attention_layernorm", "norm"))
_BERT_TP = TPPlan({**{f"encoder.layer.*.{a}.self.{p}": "colwise" for a in ("attention", "crossattention")
                      for p in ("query", "key", "value")},
                   "encoder.layer.*.attention.output.dense": "rowwise",
                   "encoder.layer.*.crossattention.output.dense": "rowwise",
                   "encoder.layer.*.intermediate.dense": "colwise", "encoder.layer.*.output.dense": "rowwise"},
                  sizes=("num_attention_heads", "intermediate_size"))
_T5_ATTENTION = ("*.block.*.layer.0.SelfAttention", "decoder.block.*.layer.1.EncDecAttention")
_T5_TP = TPPlan({**{f"{a}.{p}": "colwise" for a in _T5_ATTENTION for p in ("q", "k", "v")},
                 **{f"{a}.o": "rowwise" for a in _T5_ATTENTION},
                 "*.block.0.layer.0.SelfAttention.relative_attention_bias": "embedding_colwise",
                 **{f"*.block.*.layer.*.DenseReluDense.{w}": "colwise" for w in ("wi", "wi_0", "wi_1")},
                 "*.block.*.layer.*.DenseReluDense.wo": "rowwise"},
                local_widths={a: ("n_heads", "inner_dim") for a in _T5_ATTENTION}, sizes=("num_heads", "d_ff"))
# GPT-2's Conv1D layers store (in, out); c_attn packs q, k, v side by side and the attention
# splits its output by ``split_size`` (the per-rank width under TP).
_GPT2_TP = TPPlan({"h.*.attn.c_attn": "packed_colwise:3", "h.*.attn.c_proj": "rowwise",
                   "h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
                  local_widths={"h.*.attn": ("split_size",)}, sizes=("num_attention_heads", "n_inner"))


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
    tp: TPPlan | None = None
    """How tensor parallelism splits this architecture (None: not supported)."""


_DECODER = dict(attention="self_attn", attention_out="self_attn.o_proj", mlp="mlp", mlp_out="mlp.down_proj",
                blocks=r".*layers\.\d+")
_BERT_LIKE = dict(attention="attention", attention_out="attention.output.dense", mlp="intermediate",
                  mlp_out="output.dense", blocks=r".*layer\.\d+", post_norm=True, cross_attention="crossattention",
                  cross_attention_out="crossattention.output.dense", virtual_tokens="encoder")
_QV = ("q_proj", "v_proj")

ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(_QV, **_DECODER, virtual_tokens="decoder", kernels=_kernels("llama", "Llama"), tp=_HF_DECODER_TP),
    "mistral": ArchSpec(_QV, **_DECODER, virtual_tokens="decoder", kernels=_kernels("mistral", "Mistral"),
                        tp=_HF_DECODER_TP),
    "qwen2": ArchSpec(_QV, **_DECODER, virtual_tokens="decoder", kernels=_kernels("qwen2", "Qwen2"), tp=_HF_DECODER_TP),
    "qwen3": ArchSpec(_QV, **_DECODER, virtual_tokens="decoder", kernels=_kernels("qwen3", "Qwen3"), tp=_HF_DECODER_TP),
    "gemma": ArchSpec(_QV, **_DECODER, kernels=_kernels("gemma", "Gemma", norm_offset=1.0, casting="gemma"),
                      tp=_HF_DECODER_TP),
    # Gemma 2's hybrid sliding-window cache has no room for virtual tokens; its extra
    # pre/post-feedforward norms are not in the sequence-parallel plan.
    "gemma2": ArchSpec(_QV, **_DECODER, kernels=_kernels("gemma2", "Gemma2", act_key="hidden_activation",
                                                         norm_offset=1.0, casting="gemma"), tp=TPPlan()),
    # crossattention exists only with config.add_cross_attention.
    "gpt2": ArchSpec(("c_attn",), attention="attn", attention_out="attn.c_proj", mlp="mlp", mlp_out="mlp.c_proj",
                     blocks=r".*h\.\d+", cross_attention="crossattention", cross_attention_out="crossattention.c_proj",
                     virtual_tokens="decoder", tp=_GPT2_TP),
    "gpt_neox": ArchSpec(("query_key_value",), attention="attention", attention_out="attention.dense", mlp="mlp",
                         mlp_out="mlp.dense_4h_to_h", blocks=r".*layers\.\d+",
                         tp=TPPlan(sizes=("num_attention_heads", "intermediate_size"))),
    "bert": ArchSpec(("query", "value"), **_BERT_LIKE, tp=_BERT_TP),
    "roberta": ArchSpec(("query", "value"), **_BERT_LIKE, tp=_BERT_TP),
    # T5 blocks hold sublayer modules layer.0 (self-attn), [layer.1 (cross-attn),] layer.1|2 (FFN).
    # mlp_out is the whole FFN: its output is wo's, and T5's FFN reads wo.weight.dtype, which a
    # wrapper around wo would not have.
    "t5": ArchSpec(("q", "v"), attention=r"layer\.0\.SelfAttention", attention_out=r"layer\.0\.SelfAttention\.o",
                   mlp=r"layer\.\d+\.DenseReluDense", mlp_out=r"layer\.\d+\.DenseReluDense", blocks=r".*block\.\d+",
                   cross_attention=r"layer\.1\.EncDecAttention", cross_attention_out=r"layer\.1\.EncDecAttention\.o",
                   virtual_tokens="encoder_decoder", tp=_T5_TP),
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
