"""What transformers' ``save_pretrained`` / ``from_pretrained`` must be told about an adapted model.

Two facts live in the HF model, not in its modules:

- ``_keys_to_ignore_on_save`` (a documented ``PreTrainedModel`` attribute, matched
  exactly): the adapters' tensors are listed there while adapters are injected, so
  ``save_pretrained`` writes the base model only, under its own keys (the wrappers'
  state-dict hooks, ``AdapterLayer``, drop the ``base_layer`` level). A plain
  ``from_pretrained`` then loads it with no missing or unexpected keys. Adapters are
  saved with ``save_adapters``; an adapted plain model with
  ``eject_adapters(model, merge=True).save_pretrained(...)``.
- ``config.tie_word_embeddings``: once an eject-merge gave a tied output head its own
  weight, the config must stop saying they are tied, or transformers would drop the
  head's weight on save and tie it back to the embeddings on load.
"""

from __future__ import annotations

from torch import nn

_BASE_IGNORE = "tunekit_base_keys_to_ignore_on_save"


def _state_dict_path(model: nn.Module, path: str) -> str:
    """``path`` of a module as its state-dict keys spell it (wrappers' ``base_layer`` levels dropped)."""
    from tunekit.adapters.host import AdapterLayer

    kept, module = [], model
    for part in path.split(".") if path else []:
        if not (part == "base_layer" and isinstance(module, AdapterLayer)):
            kept.append(part)
        module = getattr(module, part)
    return ".".join(kept)


def adapter_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every adapter tensor in ``model`` (what ``save_pretrained`` must leave out)."""
    from tunekit.adapters.host import AdapterHost

    keys = set()
    for path, host in model.named_modules():
        if isinstance(host, AdapterHost):
            prefix = _state_dict_path(model, path)
            keys.update(f"{prefix}.adapters.{k}" if prefix else f"adapters.{k}" for k in host.adapters.state_dict())
    return keys


def exclude_adapters_from_save(model: nn.Module) -> None:
    """Keep ``model._keys_to_ignore_on_save`` equal to the model's own list plus its adapters' keys."""
    if not hasattr(model, "save_pretrained"):
        return
    if not hasattr(model, _BASE_IGNORE):
        setattr(model, _BASE_IGNORE, set(getattr(model, "_keys_to_ignore_on_save", None) or ()))
    own = getattr(model, _BASE_IGNORE)
    model._keys_to_ignore_on_save = own | adapter_keys(model)


def untie_merged_head(model: nn.Module) -> None:
    """After an eject-merge: ``tie_word_embeddings=False`` where the head no longer shares the embeddings' weight."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    if head is not None and embed is not None and getattr(head, "weight", None) is not embed.weight:
        config.tie_word_embeddings = False
