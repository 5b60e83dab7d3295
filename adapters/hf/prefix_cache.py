"""Virtual-token plumbing for transformers: where prefix and prompt tokens enter an HF model.

Everything tunekit knows about transformers' cache, mask and position
conventions for prefix tuning and prompt tuning lives here; the adapter
methods (``adapters/prefix``, ``adapters/prompt``) only produce tensors.

Prefix tuning (P-tuning v2) puts ``P`` trained key/value vectors in front of
every attention layer's keys. It enters through the model's cache keyword
(``past_key_values`` up to transformers 5.23, ``cache`` from 5.24; ``cache_keyword``
finds which one a forward takes, and a caller's other spelling is moved to it):

    keys of layer l:  [ prefix_k[l] (P) | cached tokens | new tokens ]
    attention mask:   [ 1 ... 1    (P) | caller's 2-D mask          ]
    positions:        real tokens start at P (the prefix occupies 0..P-1, as in PEFT)

Two cache flavours carry the prefix:
- a *stateless* cache (``PrefixLayer``) for training and plain forwards:
  ``update(k, v)`` returns ``cat(prefix, k)`` and stores nothing, so the
  activation-checkpoint replay of a layer sees exactly what the first pass
  saw. That is what makes gradient checkpointing work (PEFT refuses it:
  transformers drops a stateful cache inside checkpointed layers, and
  replaying a stateful one would append the keys twice);
- transformers' own ``DynamicCache`` (``EncoderDecoderCache`` for T5),
  pre-filled with the prefix, whenever tokens must be cached
  (``generate()``, ``use_cache=True`` in eval mode). Caches filled here are
  remembered (weakly), so a decoding step that passes one back is recognised
  and the prefix is neither re-added nor lost.

Prompt tuning (P-tuning v1) prepends ``P`` trained embeddings to the input
embeddings; ``add_prompt`` rewrites ``input_ids`` into ``inputs_embeds`` and
extends the attention mask, labels (-100), token types and positions.

Supported architectures are the rows with ``virtual_tokens`` in ``adapters/hf/arch.py``; the layouts
follow PEFT 0.21 exactly (including its T5 layout, where only the decoder's
self-attention receives the prefix), so adapters load both ways.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache, DynamicCache, EncoderDecoderCache
from transformers.cache_utils import CacheLayerMixin

from tunekit.adapters.hf.arch import arch_column, supporting
from tunekit.adapters.hf.tasks import IGNORE_INDEX

KV = list[tuple[torch.Tensor, torch.Tensor]]
_CACHE_KEYWORDS = ("cache", "past_key_values")


@functools.cache
def _forward_parameters(cls: type) -> tuple[str, ...]:
    """Parameter names of ``cls.forward`` after ``self`` (per class: signatures are slow to build)."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def cache_keyword(module: nn.Module) -> str | None:
    """The keyword ``module.forward`` takes its KV cache as (``cache`` from transformers 5.24,
    ``past_key_values`` before), or None when it takes none."""
    params = _forward_parameters(type(module))
    return next((k for k in _CACHE_KEYWORDS if k in params), None)

"""Per-layer (key, value) prefixes, each ``(KV_heads, P, D)`` (unbatched)."""


@dataclass(frozen=True)
class VirtualTokenGeometry:
    """Shapes of a model as prefix/prompt tuning sees them (PEFT's config fields)."""

    kind: str
    num_layers: int
    num_attention_heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_dim(self) -> int:
        """PEFT's ``token_dim`` for prefix tuning: one layer's key (or value) width."""
        return self.kv_heads * self.head_dim

    @property
    def num_transformer_submodules(self) -> int:
        return 2 if self.kind == "encoder_decoder" else 1


def virtual_token_geometry(model: nn.Module) -> VirtualTokenGeometry:
    """The geometry of ``model``; a clear error for architectures not supported."""
    cfg = getattr(model, "config", None)
    kind = arch_column(model, "virtual_tokens")
    if kind is None:
        raise ValueError(
            f"prefix/prompt tuning does not support model_type {getattr(cfg, 'model_type', None)!r} "
            f"({type(model).__name__}); supported: {supporting('virtual_tokens')}. Use LoRA or a bottleneck adapter instead"
        )
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if kind == "encoder_decoder":
        if cfg.d_kv * heads != cfg.hidden_size or cfg.num_decoder_layers != cfg.num_layers:
            raise ValueError(
                "prefix/prompt tuning on T5 needs d_kv * num_heads == d_model and num_decoder_layers == num_layers "
                "(PEFT's layout assumes both)"
            )
        head_dim = cfg.d_kv
    return VirtualTokenGeometry(kind, cfg.num_hidden_layers, heads, kv_heads, head_dim, cfg.hidden_size)


def prefix_layers(flat: torch.Tensor, geo: VirtualTokenGeometry, kv_heads: tuple[int, int] | None = None) -> KV:
    """Split PEFT's flat prefix ``(P, num_layers * 2 * kv_dim)`` into per-layer (key, value).

    PEFT views it as ``(P, 2L, KV, D)``; layer ``l`` gets rows ``2l`` (key) and
    ``2l + 1`` (value). For encoder-decoders PEFT duplicates the rows and hands
    decoder layer ``l`` rows ``(4l) mod 2L`` and ``(4l + 1) mod 2L`` (its other
    two rows, meant for cross-attention, are dropped by transformers), which is
    reproduced here so PEFT checkpoints give the same outputs.

    ``kv_heads``: only KV heads ``[start, stop)`` (a model whose attention computes
    a slice of the heads: tensor parallelism).
    """
    rows = flat.view(flat.shape[0], 2 * geo.num_layers, geo.kv_heads, geo.head_dim).permute(1, 2, 0, 3)
    if kv_heads is not None:
        rows = rows[:, kv_heads[0]:kv_heads[1]]
    stride = 2 * geo.num_transformer_submodules
    n = 2 * geo.num_layers
    return [(rows[(stride * i) % n], rows[(stride * i + 1) % n]) for i in range(geo.num_layers)]


class PrefixLayer(CacheLayerMixin):
    """A read-only cache layer: keys/values are ``cat(prefix, new)``; nothing is stored."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        super().__init__()
        self.prefix_keys, self.prefix_values = keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the prefix is given at construction."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.prefix_keys is None:  # cross-attention pass-through
            return key_states, value_states
        keys = torch.cat([self.prefix_keys.to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([self.prefix_values.to(value_states.dtype), value_states], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return 0 if self.prefix_keys is None else self.prefix_keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class _StatelessEncoderDecoderCache(EncoderDecoderCache):
    """Encoder-decoder cache whose cross-attention keys are recomputed on every call.

    T5 marks a cross-attention layer as "updated" and then reads stored keys;
    a checkpoint replay must recompute them instead, so the flags never stick.
    """

    @property
    def is_updated(self) -> dict:
        return {}

    @is_updated.setter
    def is_updated(self, value: dict) -> None:
        """Ignored (see the class docstring)."""


def _batched(kv: KV, batch: int) -> KV:
    return [(k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1)) for k, v in kv]


def _stateless_cache(kv: KV, batch: int, kind: str) -> Cache:
    layers = [PrefixLayer(k, v) for k, v in _batched(kv, batch)]
    if kind == "encoder_decoder":
        cross = Cache(layers=[PrefixLayer(None, None) for _ in kv])
        return _StatelessEncoderDecoderCache(Cache(layers=layers), cross)
    return Cache(layers=layers)


def _fill(cache: Cache, kv: KV, batch: int) -> None:
    target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for idx, (k, v) in enumerate(_batched(kv, batch)):
        target.update(k, v, idx)


def _new_cache(model: nn.Module, kind: str) -> Cache:
    if kind == "encoder_decoder":
        return EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    return DynamicCache(config=model.config)


class VirtualTokenHooks:
    """Per-model hook state: keyword binding, caches holding virtual tokens, checkpointing support."""

    def __init__(self, model: nn.Module) -> None:
        self.kind = virtual_token_geometry(model).kind
        self.cache_key = cache_keyword(model) or "past_key_values"
        self.caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.stateless: Cache | None = None
        # transformers' GradientCheckpointingLayer subclasses (matched by their switch, so that
        # transformers.modeling_layers, slow to import, is not needed here).
        self._checkpointed = [m for m in model.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]

    @staticmethod
    def bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
        """Positional arguments of ``module.forward`` moved into ``kwargs``, and a cache passed under
        the keyword this transformers version does not use moved to the one it does."""
        kwargs = {**dict(zip(_forward_parameters(type(module)), args)), **kwargs}
        key = cache_keyword(module)
        for other in _CACHE_KEYWORDS:
            if key is not None and other != key and other in kwargs:
                value = kwargs.pop(other)
                if kwargs.get(key) is None:
                    kwargs[key] = value
        return kwargs

    def cache(self, kwargs: dict):
        return kwargs.get(self.cache_key)

    def continuing(self, kwargs: dict, name: str | None, what: str) -> bool:
        """True when the passed cache already holds adapter ``name``'s virtual tokens.

        Raises:
            ValueError: a non-empty cache this adapter did not fill (another adapter, or none), or a
                static cache (its fixed length and 4-D masks leave no room for virtual tokens).
        """
        cache = self.cache(kwargs)
        if isinstance(cache, Cache) and cache.is_compileable:
            raise ValueError(
                f"{what} tuning does not support static KV caches (generate(cache_implementation='static'), "
                f"{type(cache).__name__}): drop cache_implementation to use the default dynamic cache"
            )
        if cache is None or not isinstance(cache, Cache) or cache.get_seq_length() == 0:
            return False
        owner = self.caches.get(cache)
        if owner != name:
            have = f"{what} adapter {owner!r}" if owner else f"no {what} tokens"
            want = f"adapter {name!r} is active" if name else "the adapters are disabled"
            raise ValueError(
                f"the passed {self.cache_key} holds {have} but {want}: continue a sequence with the adapter it "
                f"was started with, or start a new one ({self.cache_key}=None)"
            )
        return True

    def use_stateless(self, cache: Cache | None) -> None:
        """Make ``cache`` (a stateless prefix cache, or None) reach every block during this forward.

        Under gradient checkpointing transformers keeps a cache out of the
        blocks: by nulling the cache keyword, unless the block's
        ``_can_checkpoint_with_cache`` switch (documented for read-only caches)
        is set, or, in some models (GPT-2), by passing None positionally, which
        ``block_pre_hook`` undoes. Both only while a read-only cache is in use.
        """
        self.stateless = cache
        for layer in self._checkpointed:
            if cache is not None:
                layer._can_checkpoint_with_cache = True
            elif "_can_checkpoint_with_cache" in vars(layer):
                del layer._can_checkpoint_with_cache

    def install_block_hooks(self, model: nn.Module) -> list:
        """Pre-hooks on the checkpointable blocks (see ``use_stateless``) and a hook ending each forward."""
        handles = [model.register_forward_hook(self.end_forward, always_call=True)]
        for layer in self._checkpointed:
            if cache_keyword(layer) is not None:
                handles.append(layer.register_forward_pre_hook(self.block_pre_hook, with_kwargs=True))
        return handles

    def block_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.stateless is None:
            return None
        # Only a positional None is the checkpointing model's doing; a keyword None is a
        # stack that takes no cache (T5's encoder) and stays as it is.
        index = _forward_parameters(type(module)).index(cache_keyword(module))
        if index < len(args) and args[index] is None:
            args = (*args[:index], self.stateless, *args[index + 1:])
        return args, kwargs

    def end_forward(self, *_) -> None:
        self.stateless = None

    def checkpointing_active(self, model: nn.Module) -> bool:
        return model.training and any(layer.gradient_checkpointing for layer in self._checkpointed)


def _ones(batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(batch, length, dtype=like.dtype, device=like.device)


def _extend_mask(kwargs: dict, key: str, num: int, batch: int) -> None:
    mask = kwargs.get(key)
    if mask is None:
        return
    if mask.dim() != 2:
        raise ValueError(f"prefix/prompt tuning needs a 2-D {key} (batch, seq); got shape {tuple(mask.shape)}")
    kwargs[key] = torch.cat([_ones(batch, num, mask), mask], dim=1)


def _wants_cache(model: nn.Module, kwargs: dict) -> bool:
    # Training forwards get no stored cache (transformers drops it under checkpointing anyway).
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(model.config, "use_cache", False)
    return bool(use_cache) and not model.training


def _batch_size(kwargs: dict, kind: str) -> int:
    keys = ("decoder_input_ids", "decoder_inputs_embeds") if kind == "encoder_decoder" else ()
    for key in (*keys, "input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError("prefix tuning needs input_ids or inputs_embeds (decoder_input_ids for T5) to size the prefix")


def refuse_packed_rows(kwargs: dict, method: str) -> None:
    """Packed rows (several examples per row: position ids restart, no attention mask) rely on
    transformers building a block-diagonal mask without a cache; virtual tokens break that
    (one prompt per row, a cache for the prefix), so examples would attend to each other."""
    positions = kwargs.get("position_ids")
    if positions is None or kwargs.get("attention_mask") is not None or positions.shape[-1] < 2:
        return
    if (positions[..., 1:] < positions[..., :-1]).any():
        raise ValueError(f"{method} cannot run on packed rows (several examples per row); "
                         "set data.packing: false or use LoRA / bottleneck adapters")


def add_prefix(model: nn.Module, hooks: VirtualTokenHooks, kwargs: dict, name: str, kv: KV) -> dict:
    """Model kwargs with adapter ``name``'s key/value prefix ``kv`` in the cache and masks extended."""
    refuse_packed_rows(kwargs, "prefix tuning")
    num = kv[0][0].shape[-2]
    batch = _batch_size(kwargs, hooks.kind)
    mask_key = "decoder_attention_mask" if hooks.kind == "encoder_decoder" else "attention_mask"
    stateless = None
    if not hooks.continuing(kwargs, name, "prefix"):
        cache = hooks.cache(kwargs)
        if cache is not None and hooks.checkpointing_active(model):
            raise ValueError(
                f"prefix tuning with gradient checkpointing cannot fill a passed {hooks.cache_key} in training mode; "
                "call model.eval() (e.g. before generate()) or pass no cache"
            )
        if cache is None and _wants_cache(model, kwargs) and hooks.kind != "encoder":
            cache = _new_cache(model, hooks.kind)
        if cache is not None:
            _fill(cache, kv, batch)
            hooks.caches[cache] = name
        else:
            cache = stateless = _stateless_cache(kv, batch, hooks.kind)
        kwargs[hooks.cache_key] = cache
    hooks.use_stateless(stateless)
    if hooks.kind == "encoder" and kwargs.get("attention_mask") is None:
        # Encoders size the attention mask from the 2-D mask, not from the cache: spell it out.
        source = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        kwargs["attention_mask"] = torch.ones(batch, source.shape[1], dtype=torch.long, device=source.device)
    _extend_mask(kwargs, mask_key, num, batch)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + num
    return kwargs


def add_prompt(model: nn.Module, hooks: VirtualTokenHooks, kwargs: dict, name: str, num: int,
               prompt: Callable[[], torch.Tensor], embed: nn.Module) -> dict:
    """Model kwargs with adapter ``name``'s soft prompt ``prompt()`` ``(num, hidden)`` before the input embeddings.

    ``embed`` is the word-embedding layer. For encoder-decoders this runs on
    the encoder's call (see ``extend_encoder_mask``).
    """
    refuse_packed_rows(kwargs, "prompt tuning")
    if hooks.kind != "encoder_decoder" and hooks.continuing(kwargs, name, "prompt"):
        _extend_mask(kwargs, "attention_mask", num, _batch_size(kwargs, hooks.kind))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + num
        return kwargs
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = embed(kwargs["input_ids"])
    batch, length = embeds.shape[:2]
    soft = prompt().to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([soft.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    kwargs["input_ids"] = None
    mask = kwargs.get("attention_mask")
    # A T5 root call has already lengthened the mask (for cross-attention); generate() calls the encoder directly.
    if not (hooks.kind == "encoder_decoder" and mask is not None and mask.shape[-1] == length + num):
        _extend_mask(kwargs, "attention_mask", num, batch)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() >= 2 and labels.shape[1] == length and hooks.kind == "decoder":
        ignore = torch.full((batch, num), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        kwargs["labels"] = torch.cat([ignore, labels], dim=1)
    if kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([torch.zeros_like(types[:, :1]).expand(batch, num), types], dim=1)
    if kwargs.get("position_ids") is not None:
        pos = kwargs["position_ids"]
        head = torch.arange(num, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], num)
        kwargs["position_ids"] = torch.cat([head, pos + num], dim=1)
    _remember_prompt_cache(model, hooks, kwargs, name)
    return kwargs


def _remember_prompt_cache(model: nn.Module, hooks: VirtualTokenHooks, kwargs: dict, name: str) -> None:
    # Own the cache a decoder would create, so a later step passing it back is recognised.
    if hooks.kind != "decoder":
        return
    cache = hooks.cache(kwargs)
    if cache is None and _wants_cache(model, kwargs):
        cache = kwargs[hooks.cache_key] = _new_cache(model, hooks.kind)
    if isinstance(cache, Cache):
        hooks.caches[cache] = name


def extend_encoder_mask(kwargs: dict, num: int) -> dict:
    """T5 root call: the encoder output will be ``num`` tokens longer, so is the cross-attention mask."""
    source = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    encoder_outputs = kwargs.get("encoder_outputs")
    mask = kwargs.get("attention_mask")
    if mask is None:
        return kwargs
    length = source.shape[1] if source is not None else encoder_outputs[0].shape[1] - num
    if mask.shape[-1] == length:
        _extend_mask(kwargs, "attention_mask", num, mask.shape[0])
    return kwargs


def text_token_ids(tokenizer_name_or_path: str, text: str, total: int) -> list[int]:
    """Token ids of ``text`` cut or repeated to ``total`` tokens (PEFT's prompt_tuning_init TEXT)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load tokenizer {tokenizer_name_or_path!r} for init='text' ({type(err).__name__}); "
            "pass a local tokenizer folder or a Hub name available offline"
        ) from None
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise ValueError(f"init_text {text!r} tokenizes to no tokens; give a non-empty text")
    return (ids * -(-total // len(ids)))[:total]
