"""The model as tunekit would train it, built on the meta device, and its parameter inventory.

``build_model(spec)`` follows ``tunekit.load_model`` without reading a weight:
the task head is built from the config on the meta device in the run's dtype;
with ``quantization`` the linear layers transformers would quantize (its own
``get_modules_to_not_convert`` + ``replace_with_bnb_linear``: the output head,
tied weights and ``_keep_in_fp32_modules`` stay unquantized; embeddings and
norms are not linear) become bitsandbytes layers holding meta tensors in
bitsandbytes' packed layout, and the rest is prepared as PEFT's
``prepare_model_for_kbit_training`` does (``tunekit.models.loading``: fp32);
``model.kernels`` swaps in tunekit's kernel modules as loading does; then
``inject_adapters`` adds the adapter, or every weight trains
(``adapter=None``: full fine-tuning). So the trainable set is exact for every
method, and ``inventory`` counts tied weights once.

``layers`` and ``tp`` build replicas for the activation simulation: fewer
blocks, or one tensor-parallel rank's slice (query / key-value heads and the
MLP width divided by ``tp``, the head size kept).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunekit.estimate.storage import BNB_4BIT_BLOCKSIZE, int8_layout, layout_bytes, nf4_layout

__all__ = [
    "DTYPES", "Inventory", "ModelSpec", "ParamInfo", "build_model", "default_task", "inventory", "num_layers",
    "tp_divisibility_error", "tp_placements",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ENCODER_ONLY = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta"}


def default_task(config: Any) -> str:
    """The head a model trains with when nothing says otherwise."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "seq_cls" if config.model_type in _ENCODER_ONLY else "causal_lm"


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides which tensors a model holds."""

    config: Any
    """The transformers config (a copy is modified for replicas)."""
    task: str = "causal_lm"
    """causal_lm | seq_cls | seq2seq."""
    dtype: str = "fp32"
    """Weights dtype as loaded: fp32 | bf16 | fp16."""
    quantization: Any = None
    """A ``tunekit.models.QuantizationConfig`` (QLoRA with bits=4), or None."""
    adapter: Any = None
    """An adapter config (LoRAConfig, PrefixConfig, ...); None trains every weight."""
    attn: str | None = None
    """eager | sdpa | None (transformers' default)."""
    num_labels: int = 2
    """Classes of a seq_cls head."""
    kernels: bool = False
    """tunekit's kernel modules swapped in (``model.kernels``; their CPU reference path is simulated)."""
    origin: str = ""
    """Where the config came from (for the report)."""


def _layer_fields(config: Any) -> list[str]:
    fields = ["num_hidden_layers"]
    if getattr(config, "is_encoder_decoder", False) and hasattr(config, "num_decoder_layers"):
        fields.append("num_decoder_layers")
    return fields


def num_layers(config: Any) -> dict[str, int]:
    """Blocks per stack: {"num_hidden_layers": L} (+ "num_decoder_layers" for encoder-decoders)."""
    return {f: int(getattr(config, f)) for f in _layer_fields(config)}


def tp_divisibility_error(config: Any, tp: int) -> str | None:
    """Why ``tp`` cannot split this model's heads and MLP (tunekit's plan, ``tunekit.distributed.tp_plan``), or None."""
    if tp == 1:
        return None
    from tunekit.distributed.tp_plan import size_problem

    return size_problem(config, tp)


def replica_config(spec: ModelSpec, layers: dict[str, int] | None = None, tp: int = 1) -> Any:
    """A copy of the spec's config with ``layers`` blocks per stack and one TP rank's slice of the heads and MLP."""
    config = copy.deepcopy(spec.config)
    if layers:
        for name, value in layers.items():
            setattr(config, name, value)
        if isinstance(getattr(config, "layer_types", None), list):
            types = config.layer_types
            config.layer_types = [types[i % len(types)] for i in range(layers["num_hidden_layers"])]
    if tp > 1:
        error = tp_divisibility_error(config, tp)
        if error:
            raise ValueError(error)
        from tunekit.distributed.tp_plan import arch_plan

        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if config.model_type == "gpt2" and config.n_inner is None:
            config.n_inner = 4 * config.hidden_size  # GPT-2's default MLP width, made explicit to be divided
        for what in arch_plan(config).sizes:
            if isinstance(getattr(config, what, None), int):
                setattr(config, what, getattr(config, what) // tp)
    if spec.task == "seq_cls":
        config.num_labels = spec.num_labels
    return config


def auto_class(task: str) -> Any:
    """transformers' Auto class of ``task``'s head (tunekit's one task table)."""
    import transformers

    from tunekit.models.loading import TASKS

    return getattr(transformers, TASKS[task].auto_class)


def _instantiate(spec: ModelSpec, config: Any) -> nn.Module:
    auto = auto_class(spec.task)
    kwargs = {"attn_implementation": spec.attn} if spec.attn else {}
    try:
        with torch.device("meta"):
            return auto.from_config(config, dtype=DTYPES[spec.dtype], **kwargs)
    except ValueError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Unrecognized configuration class" in first:
            raise ValueError(f"{config.model_type} has no {spec.task} head in transformers ({auto.__name__}); "
                             "pick another task") from None
        raise ValueError(f"{config.model_type}: {first}") from None


def build_model(spec: ModelSpec, *, layers: dict[str, int] | None = None, tp: int = 1) -> nn.Module:
    """The model of ``spec`` on the meta device, quantized and with its adapter, ready to count or simulate.

    Raises:
        ValueError: a task the architecture has no head for, an adapter that matches
            nothing, full fine-tuning of a quantized model, a ``tp`` that does not divide the heads.
    """
    model = _instantiate(spec, replica_config(spec, layers, tp))
    if spec.quantization is not None:
        _quantize_on_meta(model, spec.quantization)
    if spec.kernels:  # tunekit.load_model swaps them in before any adapter is injected
        from tunekit.models.kernels import apply_kernels

        apply_kernels(model)
    if spec.adapter is None:
        if spec.quantization is not None:
            raise ValueError("full fine-tuning cannot train a quantized base; use an adapter (e.g. --method qlora)")
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        from tunekit.adapters import inject_adapters

        inject_adapters(model, _meta_safe(spec.adapter))
    return model


def _meta_safe(adapter: Any) -> Any:
    """``adapter`` with initialisations that need data or files (a prompt from text) made random: same tensors."""
    if getattr(adapter, "method", None) == "prompt" and adapter.init != "random":
        return adapter.model_copy(update={"init": "random", "init_text": None, "tokenizer_name_or_path": None})
    return adapter


def bnb_config(q: Any) -> Any:
    """transformers' ``BitsAndBytesConfig`` for a tunekit ``QuantizationConfig`` (as ``load_model`` builds it)."""
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[q.compute_dtype])


def _quantize_on_meta(model: nn.Module, q: Any) -> None:
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.auto import AutoHfQuantizer

    from tunekit.models.loading import prepare_quantized

    bnb = bnb_config(q)
    quantizer = AutoHfQuantizer.from_config(bnb)
    skip = quantizer.get_modules_to_not_convert(model, bnb.llm_int8_skip_modules, model._keep_in_fp32_modules)
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb)
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Linear4bit":
            module.weight = _meta_4bit_weight(module, q)
        elif kind == "Linear8bitLt":
            _meta_8bit_weight(module)
    prepare_quantized(model)


def quant_state(shape: tuple[int, int], q: Any, make: Any) -> Any:
    """A bitsandbytes ``QuantState`` for an (out, in) weight, its tensors made by ``make(shape, dtype)``."""
    import bitsandbytes.functional as bnbF

    layout = nf4_layout(math.prod(shape), q.double_quant)
    tensors = {name: make(s, dtype) for name, (s, dtype) in layout.items() if name != "weight"}
    state2 = None
    if q.double_quant:
        state2 = bnbF.QuantState(absmax=tensors["state2.absmax"], code=tensors["state2.code"],
                                 blocksize=256, dtype=torch.float32)
    return bnbF.QuantState(absmax=tensors["absmax"], shape=torch.Size(shape), code=tensors["code"],
                           blocksize=BNB_4BIT_BLOCKSIZE, quant_type=q.quant_type, dtype=DTYPES[q.compute_dtype],
                           offset=tensors.get("offset"), state2=state2)


def _meta_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _meta_4bit_weight(module: nn.Module, q: Any) -> nn.Parameter:
    import bitsandbytes as bnb

    shape = (module.out_features, module.in_features)
    packed_shape, packed_dtype = nf4_layout(math.prod(shape), q.double_quant)["weight"]
    state = quant_state(shape, q, _meta_empty)
    return bnb.nn.Params4bit(_meta_empty(packed_shape, packed_dtype), requires_grad=False, quant_state=state,
                             blocksize=BNB_4BIT_BLOCKSIZE, compress_statistics=q.double_quant,
                             quant_type=q.quant_type, bnb_quantized=True, module=module)


def _meta_8bit_weight(module: nn.Module) -> None:
    layout = int8_layout(module.out_features, module.in_features)
    module.weight.data = _meta_empty(*layout["weight"])
    module.weight.CB, module.weight.SCB = module.weight.data, _meta_empty(*layout["SCB"])


@dataclass(frozen=True)
class ParamInfo:
    """One parameter (tied ones once) as it is stored."""

    name: str
    shape: tuple[int, ...]
    """Shape of the stored tensor (a 4-bit weight's packed ``(ceil(n/2), 1)``)."""
    numel: int
    """Logical parameter count (a quantized weight's unquantized count)."""
    nbytes: int
    """Bytes it occupies, quantization tables included."""
    dtype: torch.dtype
    trainable: bool
    storage: str
    """dense | nf4 | fp4 | int8."""
    unit: str
    """The FSDP unit holding it: a block module's path (``_no_split_modules``), or "" (the root)."""


@dataclass
class Inventory:
    """Every parameter of a built model, with the sums the memory model needs."""

    params: list[ParamInfo]
    largest_layer_params: int
    """Most parameters held directly by one module (DeepSpeed's ``largest_layer_params``)."""
    buffer_bytes: int = 0
    """Buffers (rotary frequencies, position ids): on every rank, never sharded."""

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    @property
    def frozen_bytes(self) -> int:
        """Frozen parameters and buffers."""
        return sum(p.nbytes for p in self.params if not p.trainable) + self.buffer_bytes

    @property
    def trainable_bytes(self) -> int:
        return sum(p.nbytes for p in self.params if p.trainable)

    def unit_bytes(self, trainable_only: bool = False) -> dict[str, int]:
        """Bytes per FSDP unit ("" = root)."""
        units: dict[str, int] = {}
        for p in self.params:
            if p.trainable or not trainable_only:
                units[p.unit] = units.get(p.unit, 0) + p.nbytes
        return units


def _storage(param: torch.Tensor) -> tuple[str, int, int]:
    """(storage kind, logical numel, bytes) of a parameter."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        numel = math.prod(state.shape)
        return state.quant_type, numel, layout_bytes(nf4_layout(numel, state.nested))
    if param.dtype == torch.int8 and getattr(param, "SCB", None) is not None:
        return "int8", param.numel(), layout_bytes(int8_layout(*param.shape))
    return "dense", param.numel(), param.numel() * param.element_size()


def _unit_paths(model: nn.Module) -> list[str]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [path for path, module in model.named_modules() if path and type(module).__name__ in names]


def inventory(model: nn.Module) -> Inventory:
    """The parameters of ``model`` (real or meta), tied weights once, with storage bytes and FSDP units."""
    units = sorted(_unit_paths(model), key=len, reverse=True)
    params = []
    for name, param in model.named_parameters():
        kind, numel, nbytes = _storage(param)
        unit = next((u for u in units if name.startswith(u + ".")), "")
        params.append(ParamInfo(name, tuple(param.shape), numel, nbytes, param.dtype, param.requires_grad,
                                kind, unit))
    largest = max((sum(_storage(p)[1] for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return Inventory(params, largest, buffers)


def tp_placements(model: nn.Module) -> dict[str, str]:
    """Parameter-module regex -> TP style ("colwise", "rowwise", "packed_colwise:3", ...) as tunekit splits ``model``.

    The plan is the architecture table's (``tunekit.distributed.tp_plan``): transformers'
    ``base_model_tp_plan`` or tunekit's own; the output head and embeddings stay whole.
    Empty for an architecture without a plan.
    """
    from tunekit.distributed.tp_plan import placement_patterns

    try:
        return placement_patterns(model)
    except ValueError:
        return {}
