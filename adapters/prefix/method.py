"""Prefix tuning as a registered adapter method: the model-level host, injection, PEFT-format state.

Saved in PEFT's PREFIX_TUNING format: ``prompt_embeddings`` is the flat
prefix ``(P, L * 2 * kv_dim)`` as produced by the encoder (the projection
MLP folded in, as PEFT saves it), plus ``modules_to_save`` weights.
Loading a folder with ``prefix_projection=True`` therefore gives a folded
encoder, exactly as ``PeftModel.from_pretrained`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from tunekit.adapters.hf.peft_format import peft_task_type
from tunekit.adapters.prefix.config import PrefixConfig, prefix_from_peft, prefix_to_peft
from tunekit.adapters.prefix.encoder import PrefixEncoder
from tunekit.adapters.prefix.host import VirtualTokenHost, export_modules_to_save, import_modules_to_save
from tunekit.adapters.registry import AdapterMethod


class PrefixHost(VirtualTokenHost):
    """Holds named ``PrefixEncoder``s; its pre-hook puts the active one's prefix into the cache."""

    attribute = "tunekit_prefix"
    what = "prefix"
    kv_heads: tuple[int, int] | None = None
    """Feed only KV heads ``[start, stop)`` (attention that computes a slice of the heads: tensor parallelism)."""

    def register(self, model: nn.Module) -> None:
        super().register(model)
        self._handles += self.hooks.install_block_hooks(model)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        from tunekit.adapters.hf.prefix_cache import add_prefix, prefix_layers

        kwargs = self.hooks.bind(module, args, kwargs)
        name = self.current()
        if name is None:
            self.hooks.continuing(kwargs, None, self.what)  # refuses a cache that holds a prefix
            self.hooks.use_stateless(None)
            return (), kwargs
        flat = self.adapters[name]().to(self.model_dtype(module))
        return (), add_prefix(module, self.hooks, kwargs, name, prefix_layers(flat, self.geometry, self.kv_heads))


def _prefix_host(model: nn.Module) -> PrefixHost:
    host = getattr(model, PrefixHost.attribute, None)
    if not isinstance(host, PrefixHost):
        raise ValueError(f"{type(model).__name__} has no prefix adapters; inject_adapters(model, PrefixConfig()) first")
    return host


def fold_prefix(model: nn.Module, name: str | None = None) -> None:
    """Replace the reparameterisation MLP of prefix ``name`` (all when None) by its output embedding.

    Outputs are unchanged; the trainable count drops to P * L * 2 * kv_dim.
    """
    host = _prefix_host(model)
    for key, encoder in host.adapters.items():
        if name is None or key == name:
            encoder.fold()
    if name is not None and name not in host.adapters:
        raise ValueError(f"no prefix adapter named {name!r}; this model has {sorted(host.adapters)}")


class PrefixMethod(AdapterMethod):
    name = "prefix"
    config_cls = PrefixConfig
    peft_type = "PREFIX_TUNING"

    def inject(self, model: nn.Module, cfg: PrefixConfig, adapter_name: str) -> list[str]:
        host = PrefixHost.attach(model)
        geo = host.geometry
        projection = (cfg.encoder_hidden_size or geo.kv_dim) if cfg.prefix_projection else None
        encoder = PrefixEncoder(cfg.num_virtual_tokens, geo.num_layers, geo.kv_dim, projection,
                                zero_init=cfg.init_weights == "zero")
        device = next(model.parameters()).device
        host.add_adapter(adapter_name, encoder.to(device))
        return [PrefixHost.attribute]

    def export_config(self, model: nn.Module, cfg: PrefixConfig) -> dict:
        saved = prefix_to_peft(cfg, _prefix_host(model).geometry, peft_task_type(model))
        saved["base_model_name_or_path"] = getattr(model.config, "_name_or_path", None) or None
        return saved

    def import_config(self, saved: dict) -> PrefixConfig:
        return prefix_from_peft(saved)

    def export_state(self, model: nn.Module, adapter_name: str, cfg: PrefixConfig) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            flat = _prefix_host(model).adapters[adapter_name]()
        return {"prompt_embeddings": flat.detach(), **export_modules_to_save(model, adapter_name)}

    def import_state(self, model: nn.Module, adapter_name: str, cfg: PrefixConfig, state: dict) -> None:
        state = dict(state)
        if "prompt_embeddings" not in state:
            raise KeyError(f"saved prefix {adapter_name!r} lacks 'prompt_embeddings' (is it a PEFT PREFIX_TUNING folder?)")
        flat = state.pop("prompt_embeddings")
        encoder = _prefix_host(model).adapters[adapter_name]
        encoder.fold()
        if flat.shape != encoder.embedding.weight.shape:
            geo = _prefix_host(model).geometry
            raise ValueError(
                f"saved prefix has shape {tuple(flat.shape)}, this {type(model).__name__} needs "
                f"{tuple(encoder.embedding.weight.shape)} (num_virtual_tokens={cfg.num_virtual_tokens}, "
                f"num_layers={geo.num_layers}, token_dim={geo.kv_dim}): was it saved for another model?"
            )
        with torch.no_grad():
            encoder.embedding.weight.copy_(flat)
        import_modules_to_save(model, adapter_name, state)
