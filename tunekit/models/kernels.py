"""Swap Hugging Face modules for kernel-backed ones, and the fused causal-LM loss.

``apply_kernels(model)`` replaces, per instance, the RMSNorm and gated-MLP
modules of a loaded model by tunekit modules that hold the SAME parameters and
child modules (so state-dict keys, tied weights and LoRA wrappers on
``gate_proj``/``up_proj``/``down_proj`` are untouched) and compute with
``tunekit.kernels``:

    LlamaRMSNorm(weight)          ->  TunekitRMSNorm(weight)               rmsnorm()
    LlamaMLP(gate, up, down, act) ->  TunekitGatedMLP(gate, up, down)      down(glu(gate(x), up(x)))

No class is patched and no ``__class__`` is swapped; ``revert_kernels`` puts
the original modules back (with the current parameters and children).
RoPE is not swapped: transformers applies it through a module-level function
inside each attention forward, which only monkey-patching could replace. The
op is ``tunekit.kernels.rope``; the report says so.

``fused_causal_lm_loss(model, batch)`` computes ``model(**batch).loss`` without
the (B, T, V) logits: the body's final hidden states at the target positions
(``tunekit.models.heads.target_positions``) go to the chunked fused linear +
cross-entropy with the output head (and its LoRA branch, if the head is a
tunekit ``LoRALayer``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

from tunekit.adapters.hf.arch import KernelModules, arch_column, supporting
from tunekit.adapters.hf.tasks import IGNORE_INDEX
from tunekit.adapters.injection import replace_module
from tunekit.kernels import fused_linear_cross_entropy, glu, rmsnorm
from tunekit.models.heads import hf_model, target_positions

OPS = ("rmsnorm", "swiglu", "rope")
_ROPE_REASON = (
    "transformers calls apply_rotary_pos_emb as a module-level function inside each attention forward; "
    "replacing it needs monkey-patching, which tunekit does not do. Call tunekit.kernels.rope in your own attention"
)


# transformers activation names -> tunekit gated activations
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass
class KernelReport:
    """What ``apply_kernels`` swapped (op -> module names) and what it skipped (op -> reason)."""

    model_type: str
    swapped: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        done = ", ".join(f"{op}: {len(names)} modules" for op, names in self.swapped.items()) or "nothing"
        lines = [f"tunekit kernels on {self.model_type}: {done}"]
        lines += [f"  {op} not swapped: {why}" for op, why in self.skipped.items()]
        return "\n".join(lines)


class TunekitRMSNorm(nn.Module):
    """RMSNorm on ``tunekit.kernels.rmsnorm``, holding the original module's ``weight`` Parameter."""

    def __init__(self, original: nn.Module, offset: float, casting: str) -> None:
        super().__init__()
        self.weight = original.weight
        self.eps = float(getattr(original, "variance_epsilon", getattr(original, "eps", 1e-6)))
        self.offset, self.casting = offset, casting
        object.__setattr__(self, "_original", original)  # not a submodule: keeps state-dict keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps, self.offset, self.casting)

    def restore(self) -> nn.Module:
        """The original module, holding this module's current weight."""
        self._original.weight = self.weight
        return self._original

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, casting={self.casting}"


class TunekitGatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with the fused gated activation.

    Holds the original ``gate_proj``/``up_proj``/``down_proj`` modules (LoRA wrappers included).
    """

    def __init__(self, original: nn.Module, act: str) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = original.gate_proj, original.up_proj, original.down_proj
        self.act = act
        object.__setattr__(self, "_original", original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), self.act))

    def restore(self) -> nn.Module:
        """The original module, holding this module's current projections."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self._original, name, getattr(self, name))
        return self._original

    def extra_repr(self) -> str:
        return f"act={self.act}"


def kernel_spec(model: nn.Module) -> KernelModules:
    """The ``kernels`` column of ``model``'s row in ``adapters/hf/arch.py``; a clear error where it has none."""
    spec = arch_column(model, "kernels")
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"tunekit kernels do not support model_type {model_type!r} (supported: {supporting('kernels')}); "
            "set model.kernels: false and train.fused_cross_entropy: false"
        )
    return spec


def _mlp_act(model: nn.Module, spec: KernelModules) -> str:
    name = getattr(model.config, spec.act_key, None)
    if name not in _ACTS:
        raise ValueError(
            f"apply_kernels: MLP activation {spec.act_key}={name!r} has no fused kernel (supported: {sorted(_ACTS)}); "
            "drop 'swiglu' from ops"
        )
    return _ACTS[name]


def apply_kernels(model: nn.Module, ops: tuple[str, ...] = ("rmsnorm", "swiglu")) -> KernelReport:
    """Swap supported submodules of a loaded HF model for kernel-backed ones, in place.

    Args:
        model: a transformers model whose row in ``adapters/hf/arch.py`` has ``kernels``.
        ops: any of ``"rmsnorm"``, ``"swiglu"`` (SwiGLU or GeGLU MLPs), ``"rope"`` (reported as skipped).

    Returns:
        A :class:`KernelReport`.

    Raises:
        ValueError: unknown op, unsupported model type or activation, or nothing to swap.
    """
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ValueError(f"unknown kernel ops {bad}; choose from {OPS}")
    spec = kernel_spec(model)
    classes = importlib.import_module(spec.module)
    report = KernelReport(model.config.model_type)
    if "rope" in ops:
        report.skipped["rope"] = _ROPE_REASON
    targets = []
    if "rmsnorm" in ops:
        norm_cls = getattr(classes, spec.norm)
        targets.append(("rmsnorm", norm_cls, lambda m: TunekitRMSNorm(m, spec.norm_offset, spec.casting)))
    if "swiglu" in ops:
        act = _mlp_act(model, spec)
        targets.append(("swiglu", getattr(classes, spec.mlp), lambda m: TunekitGatedMLP(m, act)))
    for op, cls, make in targets:
        names = [name for name, m in model.named_modules() if type(m) is cls]
        for name in names:
            replace_module(model, name, make(model.get_submodule(name)))
        report.swapped[op] = names
    if targets and not any(report.swapped.values()):
        raise ValueError(f"apply_kernels found no {[c.__name__ for _, c, _ in targets]} in the model; "
                         "were kernels already applied? call revert_kernels(model) first")
    return report


def revert_kernels(model: nn.Module) -> int:
    """Put back the original HF modules (with current parameters/children); returns how many were restored."""
    names = [name for name, m in model.named_modules() if isinstance(m, (TunekitRMSNorm, TunekitGatedMLP))]
    for name in names:
        replace_module(model, name, model.get_submodule(name).restore())
    return len(names)


def _head_operands(head: nn.Module):
    """(weight (V, H), bias | None, (lora_a (r, H), lora_b (V, r), scaling) | None) of the output head."""
    from tunekit.adapters.lora import LoRALayer, LoRAVariant

    lora = None
    if isinstance(head, LoRALayer):
        names = head.unmerged_active()
        if len(names) > 1:
            raise ValueError(f"fused cross-entropy supports one active LoRA adapter on the output head, got {names}; "
                             "activate one or set train.fused_cross_entropy: false")
        if names:
            branch = head.adapters[names[0]]
            if type(branch.variant) is not LoRAVariant:
                raise ValueError("fused cross-entropy does not support DoRA on the output head; "
                                 "set train.fused_cross_entropy: false")
            if head.training and not isinstance(branch.dropout, nn.Identity):
                raise ValueError("fused cross-entropy cannot apply LoRA dropout on the output head; "
                                 "set the adapter's dropout to 0 or train.fused_cross_entropy: false")
            lora = (branch.lora_A.weight, branch.lora_B.weight, branch.scaling)
        head = head.base_layer
    if type(head) is not nn.Linear:
        raise ValueError(f"fused cross-entropy needs an nn.Linear output head (optionally LoRA-wrapped), got "
                         f"{type(head).__name__}; set train.fused_cross_entropy: false")
    return head.weight, head.bias, lora


def _is_sharded(tensor: torch.Tensor | None) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def fused_causal_lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0, z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``model(**batch).loss`` for a causal LM, via the fused linear + cross-entropy.

    Labels are shifted as transformers does (position t predicts t+1, the last
    position is ignored); virtual tokens a prompt-tuning host prepends are ignored.

    Args:
        model: a supported causal LM (``kernel_spec``), optionally wrapped (DDP ``.module``).
        batch: model inputs plus ``labels`` (B, T) with -100 for masked positions.
        label_smoothing, z_loss, chunk_size: see ``tunekit.kernels.fused_linear_cross_entropy``.

    Returns:
        scalar fp32 mean loss over the non-ignored targets.
    """
    hf = hf_model(model)
    kernel_spec(hf)
    if getattr(hf.config, "final_logit_softcapping", None) is not None:
        raise ValueError("fused cross-entropy does not implement final_logit_softcapping; "
                         "set train.fused_cross_entropy: false")
    if "labels" not in batch:
        raise ValueError("fused_causal_lm_loss needs 'labels' in the batch")
    picked = target_positions(model, batch, {"use_cache": False}, skip_head=True)  # hidden (N, H), targets (N,)
    weight, bias, lora = _head_operands(hf.get_output_embeddings())
    if any(_is_sharded(t) for t in (weight, *(lora or ())[:2])):
        raise ValueError("fused cross-entropy reads the output head's weight outside its forward, which a sharded "
                         "head (distributed.strategy fsdp / tp) frees by then; set train.fused_cross_entropy: false")
    lora_a, lora_b, scaling = lora if lora is not None else (None, None, 1.0)
    return fused_linear_cross_entropy(
        picked.hidden, weight, picked.targets, bias, lora_a, lora_b, scaling, IGNORE_INDEX, label_smoothing, z_loss,
        chunk_size=chunk_size,
    )
