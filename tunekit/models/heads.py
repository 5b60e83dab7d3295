"""A causal LM's output head on the positions that have a label, and nowhere else.

The loss of a causal LM needs logits only where the next token is a target
(``labels[:, 1:] != -100``); prompts and padding need none. On instruction data
that is a third to two thirds of the positions, and the head (H x V, the largest
matmul of a small model) plus its cross-entropy ran on every one of them.

``target_positions(model, batch)`` runs the model's own top-level forward, so
every wrapper and hook still runs (DDP's reducer, FSDP's pre-forward unshard of
a sharded head, a prompt-tuning host prepending virtual tokens, gradient
checkpointing), with one forward hook on the model body (``base_model_prefix``)
that replaces the body's output hidden states::

    body -> hidden (B, T', H) --hook--> hidden[targets] (1, N, H) -> the model's head -> logits (1, N, V)

The model then applies its own head (LoRA on it included) and whatever it does
after (Gemma 2's final logit soft-capping, Cohere's logit scale) to the N target
positions only. ``skip_head=True`` hands the hook an empty (B, 0, H) instead and
keeps the gathered hidden states, for the fused linear + cross-entropy, which
multiplies by the head's weight itself.

Targets are aligned as transformers' loss does: position t predicts label t+1,
the last position predicts nothing, and virtual tokens a prompt-tuning host
prepends (T' > T) have no targets, as in PEFT.

Selecting the target positions has a data-dependent size (a boolean index). Under
``dense_targets()`` every position with a next label is taken to be a target and
selected by slicing instead: the memory estimator simulates a training step on
fake tensors, which cannot have data-dependent shapes, with labels that are all
targets.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunekit.adapters.hf.tasks import IGNORE_INDEX

__all__ = ["TargetPositions", "dense_targets", "hf_model", "next_token_targets", "supports_target_head",
           "target_positions"]

_DENSE = contextvars.ContextVar("tunekit_dense_targets", default=False)


@contextlib.contextmanager
def dense_targets() -> Iterator[None]:
    """Within this block, ``target_positions`` assumes every label of the batch is a target (see the module doc)."""
    token = _DENSE.set(True)
    try:
        yield
    finally:
        _DENSE.reset(token)


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP-style wrappers (``.module``); the wrapper's own forward must still run."""
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _body(hf: nn.Module) -> nn.Module | None:
    prefix = getattr(hf, "base_model_prefix", None)
    body = getattr(hf, prefix, None) if prefix else None
    return body if isinstance(body, nn.Module) and body is not hf else None


def supports_target_head(model: nn.Module) -> bool:
    """Whether ``model`` has the layout ``target_positions`` needs: a body under ``base_model_prefix``
    whose output feeds an output head (every transformers ``*ForCausalLM``)."""
    hf = hf_model(model)
    get_head = getattr(hf, "get_output_embeddings", None)
    return _body(hf) is not None and callable(get_head) and get_head() is not None


def next_token_targets(labels: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) next-token targets of (B, T) ``labels`` for hidden states of ``length`` >= T positions.

    Virtual tokens prepended by prompt tuning (``length - T`` of them) get no target; position t
    predicts label t+1 and the last position nothing.

    Example:
        >>> next_token_targets(torch.tensor([[-100, 5, 6]]), 4).tolist()
        [[-100, 5, 6, -100]]
    """
    extra = length - labels.shape[1]
    if extra < 0:
        raise ValueError(f"the model returned {length} positions for labels of length {labels.shape[1]}")
    labels = F.pad(labels, (extra, 0), value=IGNORE_INDEX) if extra else labels
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


@dataclass
class TargetPositions:
    """What ``target_positions`` returns: N = the batch's targets."""

    targets: torch.Tensor
    """(N,) the target token ids, in row-major position order."""
    logits: torch.Tensor | None
    """(N, V) the model's logits at those positions (None with ``skip_head``)."""
    hidden: torch.Tensor | None
    """(N, H) the body's final hidden states at those positions (``skip_head`` only)."""


def _with_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output.last_hidden_state = hidden  # a ModelOutput: the attribute and the mapping entry both change
    return output


def target_positions(model: nn.Module, batch: dict[str, torch.Tensor], forward_kwargs: dict | None = None, *,
                     skip_head: bool = False) -> TargetPositions:
    """Run ``model`` on ``batch`` (without its labels) with the head only on target positions.

    Args:
        model: a transformers causal LM (``supports_target_head``), optionally wrapped (DDP, FSDP2, ...).
        batch: model inputs plus ``labels`` (B, T), -100 where nothing is learned.
        forward_kwargs: extra forward arguments (e.g. ``use_cache=False``).
        skip_head: give the head no positions and return the gathered hidden states instead.

    Returns:
        A :class:`TargetPositions`.

    Raises:
        ValueError: the model does not have the layout, or its head did not return (1, N, V) logits.
    """
    hf = hf_model(model)
    if not supports_target_head(hf):
        raise ValueError(f"{type(hf).__name__} has no body under base_model_prefix feeding an output head; "
                         "its loss cannot be restricted to target positions")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    kept: dict[str, torch.Tensor] = {}

    def gather(_module, _args, output):
        hidden = output[0]  # (B, T', H)
        targets = next_token_targets(labels.to(hidden.device), hidden.shape[1])
        if _DENSE.get():  # static shapes: what the mask picks when every label is a target
            # the last virtual token (T' - T of them) predicts label 0; the last position nothing
            first = max(hidden.shape[1] - labels.shape[1] - 1, 0)
            kept["targets"] = targets[:, first:-1].reshape(-1)
            kept["hidden"] = hidden[:, first:-1].reshape(-1, hidden.shape[-1])
        else:
            keep = targets != IGNORE_INDEX
            kept["targets"], kept["hidden"] = targets[keep], hidden[keep]  # (N,), (N, H)
        return _with_hidden(output, hidden[:, :0] if skip_head else kept["hidden"][None])

    handle = _body(hf).register_forward_hook(gather)
    try:
        out = model(**inputs, **(forward_kwargs or {}))
    finally:
        handle.remove()
    if "targets" not in kept:
        raise ValueError(f"{type(hf).__name__}'s forward did not run its body ({type(_body(hf)).__name__})")
    n = kept["targets"].shape[0]
    if skip_head:
        return TargetPositions(kept["targets"], None, kept["hidden"])
    logits = out.logits if hasattr(out, "logits") else out[0]
    if logits.ndim != 3 or tuple(logits.shape[:2]) != (1, n):
        raise ValueError(f"{type(hf).__name__}'s head returned logits {tuple(logits.shape)} for {n} gathered "
                         "positions, not (1, N, V): it post-processes the body's output per position")
    # reshape, not logits[0]: a view, whose backward is free (a select's zero-fills (1, N, V) first)
    return TargetPositions(kept["targets"], logits.reshape(n, logits.shape[-1]), None)
