"""Prompt tuning / P-tuning v1 as a registered method: the model-level host, injection, PEFT-format state.

Saved in PEFT's format (PROMPT_TUNING, or P_TUNING with an encoder):
``prompt_embeddings`` holds the N prompt rows as the encoder produces them
(reparameterisation folded in, as PEFT saves it), plus ``modules_to_save``.
"""

from __future__ import annotations

import torch
from torch import nn

from tunekit.adapters.hf.peft_format import peft_task_type
from tunekit.adapters.prefix.host import VirtualTokenHost, export_modules_to_save, import_modules_to_save
from tunekit.adapters.prompt.config import PromptConfig, prompt_from_peft, prompt_to_peft
from tunekit.adapters.prompt.encoder import PromptEncoder
from tunekit.adapters.registry import AdapterMethod


class PromptHost(VirtualTokenHost):
    """Holds named ``PromptEncoder``s; its pre-hooks prepend the active prompt to the input embeddings.

    Decoder-only and encoder models: one hook on the model root. Encoder-decoders:
    the prompt enters at the encoder's call (``generate()`` calls the encoder
    directly), and the root hook lengthens the cross-attention mask to match.
    """

    attribute = "tunekit_prompt"
    what = "prompt"

    def register(self, model: nn.Module) -> None:
        super().register(model)
        if self.geometry.kind == "encoder_decoder":
            encoder = model.get_encoder()
            self._handles.append(encoder.register_forward_pre_hook(self.encoder_pre_hook, with_kwargs=True))

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = self.hooks.bind(module, args, kwargs)
        name = self.current()
        if name is None:
            if self.geometry.kind == "decoder":
                self.hooks.continuing(kwargs, None, self.what)  # refuses a cache that holds a prompt
            return (), kwargs
        if self.geometry.kind == "encoder_decoder":
            from tunekit.adapters.hf.prefix_cache import extend_encoder_mask

            return (), extend_encoder_mask(kwargs, self.adapters[name].num_virtual_tokens)
        return (), self._add(module, kwargs, name)

    def encoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = self.hooks.bind(module, args, kwargs)
        name = self.current()
        return (), (kwargs if name is None else self._add(module, kwargs, name))

    def _add(self, module: nn.Module, kwargs: dict, name: str) -> dict:
        from tunekit.adapters.hf.prefix_cache import add_prompt

        encoder = self.adapters[name]
        embed = module.get_input_embeddings()  # the layer this (root or encoder) module embeds input_ids with
        return add_prompt(module, self.hooks, kwargs, name, encoder.num_virtual_tokens, encoder.prompt, embed)


def _prompt_host(model: nn.Module) -> PromptHost:
    host = getattr(model, PromptHost.attribute, None)
    if not isinstance(host, PromptHost):
        raise ValueError(f"{type(model).__name__} has no prompt adapters; inject_adapters(model, PromptConfig()) first")
    return host


def _initial_ids(cfg: PromptConfig, vocab_size: int, total: int) -> torch.Tensor | None:
    if cfg.init == "sample_vocab":
        return torch.randint(0, vocab_size, (total,))
    if cfg.init == "text":
        from tunekit.adapters.hf.prefix_cache import text_token_ids

        return torch.tensor(text_token_ids(cfg.tokenizer_name_or_path, cfg.init_text, total))
    return None


class PromptMethod(AdapterMethod):
    name = "prompt"
    config_cls = PromptConfig
    peft_type = "PROMPT_TUNING"

    def inject(self, model: nn.Module, cfg: PromptConfig, adapter_name: str) -> list[str]:
        host = PromptHost.attach(model)
        geo = host.geometry
        total = cfg.num_virtual_tokens * geo.num_transformer_submodules
        encoder = PromptEncoder(cfg.num_virtual_tokens, total, geo.hidden_size, cfg.encoder,
                                cfg.encoder_hidden_size, cfg.encoder_num_layers, cfg.encoder_dropout)
        word_embeddings = model.get_input_embeddings()
        encoder.to(word_embeddings.weight.device)
        ids = _initial_ids(cfg, word_embeddings.num_embeddings, total)
        if ids is not None:
            encoder.init_from(word_embeddings, ids)
        host.add_adapter(adapter_name, encoder)
        return [PromptHost.attribute]

    def export_config(self, model: nn.Module, cfg: PromptConfig) -> dict:
        saved = prompt_to_peft(cfg, _prompt_host(model).geometry, peft_task_type(model))
        saved["base_model_name_or_path"] = getattr(model.config, "_name_or_path", None) or None
        return saved

    def import_config(self, saved: dict) -> PromptConfig:
        return prompt_from_peft(saved)

    def export_state(self, model: nn.Module, adapter_name: str, cfg: PromptConfig) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            rows = _prompt_host(model).adapters[adapter_name]()
        return {"prompt_embeddings": rows.detach(), **export_modules_to_save(model, adapter_name)}

    def import_state(self, model: nn.Module, adapter_name: str, cfg: PromptConfig, state: dict) -> None:
        state = dict(state)
        if "prompt_embeddings" not in state:
            raise KeyError(f"saved prompt {adapter_name!r} lacks 'prompt_embeddings' (is it a PEFT prompt-tuning folder?)")
        rows = state.pop("prompt_embeddings")
        encoder = _prompt_host(model).adapters[adapter_name]
        if rows.shape != encoder.embedding.weight.shape:
            raise ValueError(
                f"saved prompt has shape {tuple(rows.shape)}, this {type(model).__name__} needs "
                f"{tuple(encoder.embedding.weight.shape)} (num_virtual_tokens={cfg.num_virtual_tokens} x "
                "num_transformer_submodules, hidden size): was it saved for another model?"
            )
        encoder.fold()
        with torch.no_grad():
            encoder.embedding.weight.copy_(rows)
        import_modules_to_save(model, adapter_name, state)
