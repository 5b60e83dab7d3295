"""Prompt tuning / P-tuning v1 configuration, and its mapping to PEFT's PROMPT_TUNING and P_TUNING fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tunekit.adapters.config import AdapterConfig


class PromptConfig(AdapterConfig):
    """Prompt tuning (Lester et al., 2021); with ``encoder`` set, P-tuning v1 (Liu et al., 2021).

    Example:
        >>> PromptConfig(num_virtual_tokens=8, encoder="mlp").peft_type
        'P_TUNING'
    """

    method: Literal["prompt"] = "prompt"
    """Adapter method name."""

    num_virtual_tokens: int = Field(20, gt=0)
    """Number of soft prompt embeddings P prepended to the input embeddings."""

    init: Literal["random", "sample_vocab", "text"] = "random"
    """Start from random vectors, the embeddings of random vocabulary tokens, or those of ``init_text``."""

    init_text: str | None = None
    """Text whose token embeddings initialise the prompt (``init="text"``), cut or repeated to P tokens."""

    tokenizer_name_or_path: str | None = None
    """Tokenizer for ``init_text`` (a local folder, or a Hub name available offline)."""

    encoder: Literal["none", "mlp", "lstm"] = "none"
    """P-tuning v1's prompt encoder that reparameterises the embeddings (none: plain prompt tuning)."""

    encoder_hidden_size: int | None = Field(None, gt=0)
    """Hidden width of the prompt encoder (None: the model's hidden size)."""

    encoder_num_layers: int = Field(2, gt=0)
    """LSTM layers of the ``lstm`` encoder (the ``mlp`` encoder always has 3 linear layers, as PEFT)."""

    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout between the LSTM layers."""

    @model_validator(mode="after")
    def _check_init(self) -> PromptConfig:
        if self.init == "text" and not (self.init_text and self.tokenizer_name_or_path):
            raise ValueError("init='text' needs init_text and tokenizer_name_or_path")
        if self.init != "random" and self.encoder != "none":
            raise ValueError(f"init={self.init!r} is for prompt tuning (encoder='none'); P-tuning starts random")
        return self

    @property
    def peft_type(self) -> str:
        return "PROMPT_TUNING" if self.encoder == "none" else "P_TUNING"


_INIT_TO_PEFT = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def prompt_to_peft(cfg: PromptConfig, geometry: Any, task_type: str | None) -> dict[str, Any]:
    """PEFT ``PromptTuningConfig`` / ``PromptEncoderConfig`` fields for ``cfg`` on a model of ``geometry``."""
    saved = {
        "peft_type": cfg.peft_type,
        "task_type": task_type,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": geometry.hidden_size,
        "num_transformer_submodules": geometry.num_transformer_submodules,
        "num_attention_heads": geometry.num_attention_heads,
        "num_layers": geometry.num_layers,
        "modules_to_save": cfg.modules_to_save or None,
        "inference_mode": True,
        "revision": None,
    }
    if cfg.encoder == "none":
        saved.update(prompt_tuning_init=_INIT_TO_PEFT[cfg.init], prompt_tuning_init_text=cfg.init_text,
                     tokenizer_name_or_path=cfg.tokenizer_name_or_path, tokenizer_kwargs=None)
    else:
        saved.update(encoder_reparameterization_type=cfg.encoder.upper(),
                     encoder_hidden_size=cfg.encoder_hidden_size or geometry.hidden_size,
                     encoder_num_layers=cfg.encoder_num_layers, encoder_dropout=cfg.encoder_dropout)
    return saved


def prompt_from_peft(saved: dict[str, Any]) -> PromptConfig:
    """A ``PromptConfig`` from PEFT's PROMPT_TUNING or P_TUNING fields."""
    common = dict(num_virtual_tokens=saved["num_virtual_tokens"],
                  modules_to_save=list(dict.fromkeys(saved.get("modules_to_save") or [])))
    if saved.get("peft_type") == "P_TUNING":
        return PromptConfig(
            encoder=str(saved.get("encoder_reparameterization_type", "MLP")).lower(),
            encoder_hidden_size=saved.get("encoder_hidden_size"),
            encoder_num_layers=saved.get("encoder_num_layers", 2),
            encoder_dropout=saved.get("encoder_dropout", 0.0),
            **common,
        )
    init = {v: k for k, v in _INIT_TO_PEFT.items()}[saved.get("prompt_tuning_init", "RANDOM")]
    return PromptConfig(init=init, init_text=saved.get("prompt_tuning_init_text"),
                        tokenizer_name_or_path=saved.get("tokenizer_name_or_path"), **common)
