"""Load a base model and its tokenizer for one task, as a ``ModelConfig`` describes.

Steps: resolve the source (Hub id / local folder / ``pkg:<package>``), build
the config (``config_overrides``, label names for classification, pad id),
load or build the model with the task's head, quantize with bitsandbytes if
asked (then prepare it the way PEFT's ``prepare_model_for_kbit_training``
does: base frozen, norms and other small parameters in fp32, input
embeddings' outputs requiring grad so checkpointed blocks still backprop),
pick the attention implementation, and optionally swap in tunekit kernels.

Every failure a user can cause (missing folder, unknown model, no head for
the task, a package without a model) is one ``ValueError`` line naming
``model.<key>`` and the fix.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunekit.adapters.hf.layers import keep_4bit_layout_trainable
from tunekit.adapters.hf.tasks import TASKS
from tunekit.models.config import ModelConfig

__all__ = ["TASKS", "load_model", "load_model_config", "load_tokenizer", "resolve_source"]

_DTYPES: dict[str, Any] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}


def resolve_source(name: str, key: str = "model.name_or_path") -> str:
    """A loadable path or Hub id for ``name`` (``pkg:`` resolved, local folders checked).

    Raises:
        ValueError: a ``pkg:`` package is missing, or a local-looking path does not exist.
    """
    if name.startswith("pkg:"):
        package = name[len("pkg:"):]
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"{key}={name!r}: Python package {package!r} is not installed (pip install it)")
        module = importlib.import_module(package)
        get_path = getattr(module, "get_model_path", None)
        folder = Path(get_path()) if callable(get_path) else Path(module.__file__).parent
        if not (folder / "config.json").is_file():
            raise ValueError(f"{key}={name!r}: {folder} holds no config.json, so it is not a model folder")
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{key}={name!r} is a file; point at the model folder that holds config.json")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"{key}={name!r}: local folder not found (give an existing folder, a Hub id, "
                         "or pkg:<package>)")
    return name  # a Hub id


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``cfg`` (``cfg.tokenizer`` or the model's), with a pad token ensured."""
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    source = resolve_source(cfg.tokenizer or cfg.name_or_path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision,
                                                  trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(f"{key}={source!r}: cannot load a tokenizer ({_first_line(err)})") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing
        # token serves; a new one is added only when the vocab has neither.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def load_model_config(cfg: ModelConfig):
    """The transformers config ``load_model`` would build (``config_overrides`` applied), without any weights.

    What the checks before a launch read (tensor parallelism's head and width divisibility).
    """
    source = resolve_source(cfg.name_or_path) if cfg.name_or_path else None
    return _model_config(cfg, source, "causal_lm", None)[0]


def _model_config(cfg: ModelConfig, source: str | None, task: str, label_names: list[str] | None):
    from transformers import AutoConfig

    try:
        if source is None:
            config = AutoConfig.for_model(cfg.model_type)
        else:
            config = AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        what = f"model.model_type={cfg.model_type!r}" if source is None else f"model.name_or_path={source!r}"
        raise ValueError(f"{what}: cannot load a model config ({_first_line(err)})") from None
    for field, value in cfg.config_overrides.items():
        setattr(config, field, value)
    if task == "seq_cls" and label_names:
        # A checkpoint's own head (another label set) cannot be reused: start a new one.
        new_head = source is not None and config.num_labels != len(label_names)
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
        return config, new_head
    return config, False


def _instantiate(cfg: ModelConfig, source: str | None, config, task: str, new_head: bool,
                 on_meta: bool = False) -> nn.Module:
    import transformers

    auto = getattr(transformers, TASKS[task].auto_class)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[cfg.dtype]}
    if cfg.attn_implementation not in (None, "auto"):  # auto: chosen once the data is known (models.fastpath)
        kwargs["attn_implementation"] = _attention(cfg.attn_implementation)
    try:
        if cfg.from_config or on_meta:
            dtype = kwargs.pop("dtype")
            if dtype == "auto":  # what from_pretrained would pick: the checkpoint's dtype
                dtype = getattr(config, "dtype", None) if on_meta and not cfg.from_config else None
            with torch.device("meta") if on_meta else contextlib.nullcontext():
                model = auto.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs)
            return model if cfg.from_config else model.eval()  # from_pretrained returns it in eval mode
        if cfg.quantization is not None:
            kwargs.update(_quantization(cfg, task))
        if new_head:
            kwargs["ignore_mismatched_sizes"] = True
        return auto.from_pretrained(source, config=config, revision=cfg.revision,
                                    trust_remote_code=cfg.trust_remote_code, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(f"model {source or cfg.model_type!r} ({config.model_type}) has no {task} head in "
                             f"transformers ({TASKS[task].auto_class}); pick another model or model.task") from None
        raise ValueError(f"model.name_or_path={source!r}: {_first_line(err)}") from None
    except OSError as err:
        raise ValueError(f"model.name_or_path={source!r}: cannot load weights ({_first_line(err)})") from None


def _attention(name: str) -> str:
    if name == "tunekit":
        try:
            from tunekit.models.attention import register_tunekit_attention
        except ImportError:
            raise ValueError("model.attn_implementation='tunekit' needs tunekit.models.attention, which this "
                             "install lacks; use 'sdpa' or 'eager'") from None
        register_tunekit_attention()
    return name


# A classifier's head modules (BERT, RoBERTa, DistilBERT; decoders' `score`): new, trained in full, never quantized.
_CLASSIFIER_HEADS = ["classifier", "pre_classifier", "score"]


def _quantization(cfg: ModelConfig, task: str) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    # transformers keeps "the last module" in full precision by taking the last *parameter* name and
    # stripping ".weight": a head with a bias (`classifier.bias`) is missed, quantized, and then filled
    # with newly initialised plain Parameters a bitsandbytes layer cannot use ("no attribute quant_state"
    # / "CB"). A classification head is named explicitly instead, as PEFT's QLoRA-classifier recipes do.
    skip = {"llm_int8_skip_modules": _CLASSIFIER_HEADS} if task == "seq_cls" else {}
    if q.bits == 8:
        bnb = BitsAndBytesConfig(load_in_8bit=True, **skip)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                 bnb_4bit_use_double_quant=q.double_quant,
                                 bnb_4bit_compute_dtype=_DTYPES[q.compute_dtype], **skip)
    kwargs: dict[str, Any] = {"quantization_config": bnb}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return kwargs


def prepare_quantized(model: nn.Module) -> None:
    """PEFT's ``prepare_model_for_kbit_training``: freeze, upcast small params, input grads on."""
    for param in model.parameters():
        param.requires_grad_(False)
        # Quantized weights are integer (or packed uint8) tensors; the rest (norms,
        # embeddings, heads) are upcast so their math and any training stay stable.
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    # With gradient checkpointing and a frozen base nothing before the first
    # block requires grad, so reentrant checkpointing would drop every adapter grad.
    model.enable_input_require_grads()
    # bitsandbytes' CPU repack would stop gradients after the first evaluation.
    keep_4bit_layout_trainable(model)


def load_model(cfg: ModelConfig, *, task: str, num_labels: int | None = None,
               label_names: list[str] | None = None, on_meta: bool = False) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` for ``task`` ("causal_lm" | "seq_cls" | "seq2seq").

    For ``seq_cls`` pass the label names (or at least ``num_labels``): they size
    the head and become ``config.id2label`` / ``label2id``. ``on_meta`` builds the same
    model on the meta device, reading no weights (the ranks of an FSDP job that receive
    their shards from rank 0); not for a quantized base.

    Raises:
        ValueError: one line naming the model key and the fix.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {sorted(TASKS)}")
    if label_names is None and num_labels is not None:
        label_names = [f"LABEL_{i}" for i in range(num_labels)]
    source = resolve_source(cfg.name_or_path) if cfg.name_or_path else None
    tokenizer = load_tokenizer(cfg)
    if on_meta and cfg.quantization is not None:
        raise ValueError("model.quantization: a quantized base cannot be built on the meta device; load it on every rank")
    config, new_head = _model_config(cfg, source, task, label_names)
    model = _instantiate(cfg, source, config, task, new_head, on_meta)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # a pad token was added
    model.config.pad_token_id = tokenizer.pad_token_id
    if task == "seq_cls":
        # Decoder classifiers (transformers names their head `score`) pool the last position when
        # the input arrives as embeddings (prompt tuning): left padding keeps a real token there.
        # Encoders pool the first token. tunekit.data's collate follows this setting.
        tokenizer.padding_side = "left" if hasattr(model, "score") else "right"
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.quantization is not None:
        prepare_quantized(model)
    if cfg.kernels:
        try:
            from tunekit.models.kernels import apply_kernels
        except ImportError:
            raise ValueError("model.kernels=true needs tunekit.models.kernels, which this install lacks; "
                             "set model.kernels: false") from None
        apply_kernels(model)
    return model, tokenizer
