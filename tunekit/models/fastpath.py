"""The default training path of a causal LM: packing and the varlen attention, where they are exact.

``tunekit finetune`` with ``data.packing`` and ``model.attn_implementation`` left at
their defaults (``null`` / ``auto``) calls ``choose_fast_path`` once the base model is
loaded (before adapters go in)::

    causal LM, adapter not prefix / prompt tuning   -> try packing
        attention "auto"                            -> try attn_implementation "tunekit"
        probe: a packed row must give each example's own logits, else the next choice
    otherwise                                       -> no packing, transformers' attention

Packing is refused for prefix and prompt tuning (their virtual tokens would be one
shared context of a packed row), and it is exact only when the model keeps packed
examples apart: transformers' masks do so from restarting position ids, but not every
architecture passes them on (Bloom, Falcon, MPT build their masks without them), and
remote code may not. So the choice is checked on the loaded model itself: ``packs_exactly``
runs one packed row of two short sequences and compares the second one's logits with the
sequence alone, against how far they move when the two do attend to each other. A
setting the user wrote (``data.packing: false`` to opt out, any ``attn_implementation``)
is kept as written; ``data.packing: true`` on a model that fails the probe is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tunekit.data.collate import varlen_kwargs

__all__ = ["FastPath", "adopt_fast_path", "choose_fast_path", "packs_exactly"]

VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")
_PROBE = (8, 3)  # lengths of the two probe sequences: the short one would see the long one's keys


@dataclass(frozen=True)
class FastPath:
    """What ``choose_fast_path`` picked."""

    packing: bool
    """Pack training rows (``data.packing``)."""
    attn_implementation: str | None
    """The attention the model now runs (``config._attn_implementation``)."""
    note: str
    """One line for the log: what was chosen and how to opt out."""


@torch.no_grad()
def packs_exactly(model: nn.Module) -> bool | None:
    """Whether a packed row (restarting ``position_ids`` plus the collator's varlen arguments)
    keeps its examples apart in ``model``, measured on the model itself.

    The second probe sequence packed after the first must give its own logits: the error must
    be under a tenth of what letting it attend to the first one changes (a bound that holds in
    any dtype). A forward that refuses the packed arguments, or refuses to train (tunekit's
    attention has no dropout), fails; ``None``: the model cannot run here (meta weights).
    """
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        return None
    first, second = _PROBE
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(first + second, device=param.device)[None] * 7 + 3) % vocab  # (1, T)
    positions = torch.cat([torch.arange(first), torch.arange(second)])[None]
    was_training = model.training
    # The probe draws no random numbers from the run's streams (dropout in the training forward).
    devices = [param.device] if param.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _probe(model, ids, positions, first, was_training)


def _probe(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, first: int, was_training: bool) -> bool:
    device = ids.device
    try:
        model.train()  # what training runs: an attention that refuses dropout refuses it here
        model(input_ids=ids[:, :first], use_cache=False)
        model.eval()
        packed = model(input_ids=ids, position_ids=positions.to(device), use_cache=False,
                       **_on(varlen_kwargs(positions), device)).logits[0, first:]
        alone = model(input_ids=ids[:, first:], use_cache=False).logits[0]
        crossed = model(input_ids=ids, use_cache=False).logits[0, first:]  # one sequence: attends across
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    error, crossing = (packed - alone).abs().max(), (crossed - alone).abs().max()
    return bool(error <= 0.1 * crossing) and bool(crossing > 0)


def _on(kwargs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}


def _switch_attention(model: nn.Module, name: str) -> bool:
    """Set the model's attention implementation; False when transformers refuses it."""
    if model.config._attn_implementation == name:
        return True
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():  # not on AttentionInterface: transformers would only warn
        return False
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError):
        return False
    return model.config._attn_implementation == name


def choose_fast_path(model: nn.Module, *, task: str, method: str, packing: bool | None,
                     attn_implementation: str | None) -> FastPath:
    """Pick packing and the attention implementation of a training run (see the module docstring).

    Args:
        model: the loaded base model (adapters not injected yet); its attention may be switched in place.
        task: the run's task; only ``causal_lm`` packs.
        method: the adapter method (prefix / prompt tuning never pack).
        packing: ``data.packing`` as configured (``None``: pack where exact).
        attn_implementation: ``model.attn_implementation`` as configured (``"auto"``: tunekit's
            varlen attention where exact when packing, else the one loaded).

    Returns:
        A :class:`FastPath`.

    Raises:
        ValueError: ``packing=True`` on a model that lets packed examples attend to each other.
    """
    loaded = model.config._attn_implementation
    if packing is False or task != "causal_lm" or method in VIRTUAL_TOKEN_METHODS:
        return FastPath(False, loaded, f"data.packing: false, attention {loaded}")
    candidates = [loaded]
    if attn_implementation == "auto" and loaded != "tunekit":
        from tunekit.models.attention import register_tunekit_attention

        candidates.insert(0, register_tunekit_attention())
    for name in candidates:
        verdict = packs_exactly(model) if _switch_attention(model, name) else False
        if verdict or (verdict is None and packing and name == loaded):
            how = "as configured" if packing else "the default here; data.packing: false opts out"
            return FastPath(True, name, f"data.packing: true ({how}; train.batch_size counts packed rows of up to "
                                        f"data.max_seq_len tokens), attention {name}")
    _switch_attention(model, loaded)
    if packing:
        raise ValueError(f"data.packing: true, but {type(model).__name__} with attention {loaded!r} lets packed "
                         "examples attend to each other; set data.packing: false")
    return FastPath(False, loaded, f"data.packing: false ({type(model).__name__} does not keep packed examples "
                                   f"apart with attention {loaded}), attention {loaded}")


def adopt_fast_path(model: nn.Module, fast: FastPath) -> None:
    """Give ``model`` the attention another process's ``choose_fast_path`` picked (a model on the meta device
    cannot run the probe; the ranks of one job must train the same way).

    Raises:
        ValueError: this model refuses that attention implementation.
    """
    from tunekit.models.attention import ATTN_IMPLEMENTATION, register_tunekit_attention

    if fast.attn_implementation == ATTN_IMPLEMENTATION:
        register_tunekit_attention()  # registered where rank 0 chose it, not yet here
    if fast.attn_implementation and not _switch_attention(model, fast.attn_implementation):
        raise ValueError(f"attention {fast.attn_implementation!r}, chosen on rank 0, is refused by this rank's "
                         f"{type(model).__name__}; set model.attn_implementation explicitly")
