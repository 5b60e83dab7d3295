"""Tensor parallelism that splits the adapters with their base layers.

Applied after injection with ``parallelize_module``: the plan's linear layers
(``tp_plan.resolve_layers``) get their weights split as DTensors on the ``tp`` mesh
dim. Where an adapter wraps one, the linear is the wrapper's ``base_layer`` and the
collective moves out to the wrapper, so the adapter's math runs inside the same
TP region as the base's and shares its one collective::

    colwise base (W rows split)            rowwise base (W columns split)
    x ─► from_local(Replicate) ─┬► W_r x       x_r ─► from_local(Shard(-1)) ─┬► W_r x_r   (partial)
                                └► B_r (A x)                                 └► B (A_r x_r)  (partial)
          (+) ─► local out shard              (+) ─► all-reduce ─► out   (the base's own one)
    backward: one all-reduce of x's grad      backward: no collective

    lora_A replicated, lora_B split like     lora_A split like W's input, lora_B replicated
    W's output (DoRA's magnitude too)        (DoRA: one reduction of the squared row norms)

The replicated factor's gradient comes back as a partial sum (``Partial`` DTensor):
``tp_grads.reduce_partial_grads`` sums all of them in one bucketed all-reduce
before clipping. Adapters outside the plan's layers (bottlenecks on the replicated
hidden states, prefix encoders, prompt encoders, trained heads) hold replicated
parameters and need no communication; a prefix feeds each rank only its KV heads
(``PrefixHost.kv_heads``), so its gradient is partial like a replicated factor's.

GPT-2's fused q/k/v (``packed_colwise:3``): each of q, k, v is split on its own, so
rank r holds ``[q_r, k_r, v_r]``. Its weights (and the adapter factors on that
output) are stored permuted so that a plain ``Shard`` gives that layout;
``TPReport.packed`` records the permutation, and saves and checkpoints undo it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from tunekit.adapters.hf.layers import is_conv1d, is_linear_like
from tunekit.adapters.host import AdapterHost, AdapterLayer, ModulesToSave
from tunekit.adapters.lora import LoRALayer
from tunekit.adapters.lora.variants import DoRAVariant
from tunekit.distributed.tp_plan import TPLayer, local_width_modules, resolve_layers


@dataclass
class TPReport:
    """What ``parallelize`` did to a model."""

    layers: list[str] = field(default_factory=list)
    """Plan modules split (their paths)."""
    adapter_boundaries: list[str] = field(default_factory=list)
    """Adapter wrappers whose adapters ride on their base layer's collective."""
    replicated: list[str] = field(default_factory=list)
    """Adapter modules held whole on every rank."""
    packed: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    """Parameter name -> (dim, permutation): its DTensor holds ``canonical.index_select(dim, perm)``."""


# ---------------------------------------------------------------------- parameter placement

def packed_permutation(size: int, parts: int, tp: int) -> torch.Tensor:
    """Indices that reorder ``parts`` side-by-side blocks so that rank r's contiguous chunk is each block's r-th chunk.

    Example:
        >>> packed_permutation(6, 3, 2).tolist()   # [q0 q1 | k0 k1 | v0 v1] -> [q0 k0 v0 | q1 k1 v1]
        [0, 2, 4, 1, 3, 5]
    """
    block, chunk = size // parts, size // parts // tp
    return torch.tensor([j * block + r * chunk + i for r in range(tp) for j in range(parts) for i in range(chunk)])


def _distribute(owner: nn.Module, leaf: str, mesh, placement: Placement, perm: tuple[int, torch.Tensor] | None = None):
    """Replace ``owner.<leaf>`` by a DTensor parameter (each rank keeps its own slice: no communication)."""
    param = owner._parameters.get(leaf)
    if param is None or isinstance(param, DTensor):
        return
    data = param.detach()
    if perm is not None:
        data = data.index_select(perm[0], perm[1].to(data.device))
    owner._parameters[leaf] = nn.Parameter(distribute_tensor(data, mesh, [placement], src_data_rank=None),
                                           requires_grad=param.requires_grad)


def _linear_dims(module: nn.Module) -> tuple[int, int]:
    """(output dim, input dim) of the weight: (0, 1) for nn.Linear, (1, 0) for Conv1D's (in, out)."""
    return (1, 0) if is_conv1d(module) else (0, 1)


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[_linear_dims(module)[0]]


def _packed(module: nn.Module, parts: int, tp: int) -> torch.Tensor | None:
    return packed_permutation(_out_features(module), parts, tp) if parts > 1 else None


class ShardLinear(ParallelStyle):
    """Split a plan module's own parameters (a linear-like layer, or T5's per-head bias embedding).

    With ``boundary`` it also converts its input and output (a layer no adapter wraps);
    otherwise the adapter wrapper around it does (``AdapterBoundary``).
    """

    def __init__(self, layer: TPLayer, *, boundary: bool, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.layer, self.boundary, self.sequence_parallel = layer, boundary, sequence_parallel

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        style = self.layer.style
        if style == "embedding_colwise":
            if not isinstance(module, nn.Embedding):
                raise ValueError(f"{self.layer.path}: embedding_colwise needs an nn.Embedding, got {type(module).__name__}")
            _distribute(module, "weight", device_mesh, Shard(1))
        elif style == "replicate":
            for leaf in list(module._parameters):
                _distribute(module, leaf, device_mesh, Replicate())
        else:
            _shard_linear_params(module, style, self.layer.parts, device_mesh)
        if self.boundary:
            install_boundary(module, device_mesh, style, self.sequence_parallel)
        return module


def _shard_linear_params(module: nn.Module, style: str, parts: int, mesh) -> None:
    if not is_linear_like(module):
        raise ValueError(f"tensor parallelism splits nn.Linear and Conv1D layers, not {type(module).__name__}")
    out_dim, in_dim = _linear_dims(module)
    if style == "rowwise":
        _distribute(module, "weight", mesh, Shard(in_dim))
        _distribute(module, "bias", mesh, Replicate())
        return
    perm = _packed(module, parts, mesh.size())
    _distribute(module, "weight", mesh, Shard(out_dim), None if perm is None else (out_dim, perm))
    _distribute(module, "bias", mesh, Shard(0), None if perm is None else (0, perm))


# ---------------------------------------------------------------------- the TP region's boundary

def _layouts(style: str, sequence_parallel: bool) -> tuple[Placement, Placement]:
    """(input layout, output layout) of a plan module's TP region."""
    if style == "rowwise":
        return Shard(-1), Shard(1) if sequence_parallel else Replicate()
    if style in ("colwise", "packed_colwise", "embedding_colwise"):
        return Replicate(), Shard(-1)
    return Replicate(), Replicate()


def to_region(x, mesh, layout: Placement):
    """``x`` as a DTensor of ``layout`` (a local tensor is taken as this rank's piece, without communication)."""
    if isinstance(x, DTensor):
        return x if tuple(x.placements) == (layout,) else x.redistribute(mesh, [layout])
    if torch.is_tensor(x):
        return DTensor.from_local(x, mesh, [layout], run_check=False)
    return x


def install_boundary(module: nn.Module, mesh, style: str, sequence_parallel: bool = False) -> None:
    """Hooks that enter ``module``'s TP region on its first input and leave it on its output.

    Leaving a rowwise region is the base layer's collective (all-reduce, or reduce-scatter
    to sequence shards); entering a colwise one costs an all-reduce of the input's gradient.
    """
    in_layout, out_layout = _layouts(style, sequence_parallel)

    def enter(_module, args, kwargs):
        if not args:
            return None
        return (to_region(args[0], mesh, in_layout), *args[1:]), kwargs

    def leave(_module, _args, _kwargs, out):
        if isinstance(out, DTensor):
            return to_region(out, mesh, out_layout).to_local()
        return out

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, with_kwargs=True)


# lora_A, lora_B, DoRA's magnitude: placements beside a colwise / rowwise / replicated base.
_FACTOR_PLACEMENTS = {
    "colwise": {"lora_A": None, "lora_B": 0, "lora_magnitude_vector": 0},
    "rowwise": {"lora_A": 1, "lora_B": None, "lora_magnitude_vector": None},
    "replicate": {"lora_A": None, "lora_B": None, "lora_magnitude_vector": None},
}


class ShardedDoRAVariant(DoRAVariant):
    """DoRA beside a rowwise-split base: the row norms of ``W + s·B A`` are a partial reduction
    over the input shards; it is finished once (one all-reduce of the squared norms) and the
    replicated result is what the forward uses and backward keeps (no second reduction)."""

    def row_norm(self, combined: torch.Tensor) -> torch.Tensor:
        norm = super().row_norm(combined)
        if isinstance(norm, DTensor) and any(p.is_partial() for p in norm.placements):
            norm = norm.redistribute(placements=[Replicate()] * norm.device_mesh.ndim)
        return norm


class AdapterBoundary(ParallelStyle):
    """A LoRA wrapper around a plan module: its factors split consistently with the base, and the region's boundary."""

    def __init__(self, layer: TPLayer, report: TPReport, prefix: str, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.layer, self.report, self.prefix, self.sequence_parallel = layer, report, prefix, sequence_parallel

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        style = "colwise" if self.layer.style == "packed_colwise" else self.layer.style
        if style not in _FACTOR_PLACEMENTS:
            raise ValueError(f"{self.prefix}: LoRA cannot wrap a {self.layer.style} tensor-parallel module")
        perm = _packed(module.base_layer, self.layer.parts, device_mesh.size())
        for adapter_name, branch in module.adapters.items():
            if type(branch.variant) is DoRAVariant:
                branch.variant = ShardedDoRAVariant()
            for part, dim in _FACTOR_PLACEMENTS[style].items():
                owner, leaf = (branch, part) if part == "lora_magnitude_vector" else (getattr(branch, part), "weight")
                if owner._parameters.get(leaf) is None:
                    continue
                placement = Replicate() if dim is None else Shard(dim)
                packed = (dim, perm) if perm is not None and dim == 0 else None
                if packed is not None:
                    suffix = part if owner is branch else f"{part}.weight"
                    self.report.packed[f"{self.prefix}.adapters.{adapter_name}.{suffix}"] = packed
                _distribute(owner, leaf, device_mesh, placement, packed)
        bias = module.base_layer._parameters.get("bias")
        if perm is not None and bias is not None and bias.requires_grad:
            self.report.packed[f"{self.prefix}.base_layer.bias"] = (0, perm)
        install_boundary(module, device_mesh, style, self.sequence_parallel)
        return module


class ReplicatedModule(ParallelStyle):
    """An adapter module held whole on every rank: replicated DTensor parameters, local tensors outside.

    ``partial_grads``: the module's output is consumed partly on each rank (a prefix's
    KV heads), so the gradient flowing back is a partial sum (reduced before clipping).
    """

    def __init__(self, partial_grads: bool = False) -> None:
        super().__init__()
        self.partial_grads = partial_grads

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        for owner in module.modules():
            for leaf in list(owner._parameters):
                _distribute(owner, leaf, device_mesh, Replicate())
        grad_placements = [Partial()] if self.partial_grads else None

        def enter(_module, args, kwargs):
            convert = lambda v: to_region(v, device_mesh, Replicate()) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
            return tuple(convert(a) for a in args), {k: convert(v) for k, v in kwargs.items()}

        def leave(_module, _args, _kwargs, out):
            if isinstance(out, DTensor):
                return out.to_local(grad_placements=grad_placements)
            if isinstance(out, tuple):
                return tuple(o.to_local(grad_placements=grad_placements) if isinstance(o, DTensor) else o for o in out)
            return out

        module.register_forward_pre_hook(enter, with_kwargs=True)
        module.register_forward_hook(leave, with_kwargs=True)
        return module


# ---------------------------------------------------------------------- the whole model

def _split_point(model: nn.Module, layer: TPLayer) -> tuple[str, nn.Module, LoRALayer | None]:
    """(path of the module to split, that module, the LoRA wrapper directly around it or None)."""
    path, module, lora = layer.path, model.get_submodule(layer.path), None
    while isinstance(module, AdapterLayer):
        if isinstance(module, ModulesToSave):
            raise ValueError(f"{layer.path} is trained in full (modules_to_save) but tensor parallelism splits it; "
                             "remove it from modules_to_save or use strategy fsdp")
        if lora is not None:
            raise ValueError(f"{layer.path}: a LoRA adapter wraps another adapter there; tensor parallelism needs "
                             "LoRA directly around the layer (inject LoRA last)")
        lora = module if isinstance(module, LoRALayer) else None
        path, module = f"{path}.base_layer", module.base_layer
    return path, module, lora


def _plan_layers(model: nn.Module, report: TPReport, sequence_parallel: bool) -> tuple[dict, set[int]]:
    plan, covered = {}, set()
    for layer in resolve_layers(model):
        path, module, lora = _split_point(model, layer)
        if layer.style == "replicate":
            if any(p.requires_grad for p in module.parameters()):
                raise ValueError(f"{layer.path} is trained but kept whole under tensor parallelism (its gradient "
                                 "would differ per rank); do not train it, or use strategy fsdp")
            continue
        plan[path] = ShardLinear(layer, boundary=lora is None, sequence_parallel=sequence_parallel)
        if lora is not None:
            lora_path = path.removesuffix(".base_layer")
            plan[lora_path] = AdapterBoundary(layer, report, lora_path, sequence_parallel)
            report.adapter_boundaries.append(lora_path)
            covered.add(id(lora))
        report.layers.append(layer.path)
    return plan, covered


def _plan_adapters(model: nn.Module, report: TPReport, covered: set[int]) -> dict:
    from tunekit.adapters.prefix.method import PrefixHost

    plan = {}
    for path, host in model.named_modules():
        if not isinstance(host, AdapterHost) or id(host) in covered:
            continue
        if isinstance(host, LoRALayer):  # LoRA on a layer the plan keeps whole (an output head)
            plan[path] = AdapterBoundary(TPLayer(path, "replicate"), report, path)
            plan[f"{path}.base_layer"] = ShardLinear(TPLayer(path, "replicate"), boundary=False)
            report.adapter_boundaries.append(path)
            continue
        for name in host.adapters:
            plan[f"{path}.adapters.{name}" if path else f"adapters.{name}"] = ReplicatedModule(
                partial_grads=isinstance(host, PrefixHost))
            report.replicated.append(f"{path}.adapters.{name}")
    return plan


def _check_all_trainable_placed(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and not isinstance(p, DTensor):
            raise ValueError(f"{name} trains outside any adapter, which tensor parallelism cannot place "
                             "(a trained base bias?); set adapter.bias: none or use strategy fsdp")


def _set_local_widths(model: nn.Module, tp: int) -> None:
    for path, attrs in local_width_modules(model):
        module = model.get_submodule(path)
        for attr in attrs:
            width = getattr(module, attr)
            if width % tp:
                raise ValueError(f"{path}.{attr}={width} does not divide by tp_size={tp}")
            setattr(module, attr, width // tp)


def _feed_prefix_heads(model: nn.Module, mesh) -> None:
    from tunekit.adapters.prefix.method import PrefixHost

    host = getattr(model, PrefixHost.attribute, None)
    if isinstance(host, PrefixHost):
        per_rank = host.geometry.kv_heads // mesh.size()
        start = mesh.get_local_rank() * per_rank
        host.kv_heads = (start, start + per_rank)


def parallelize(model: nn.Module, mesh, *, sequence_parallel: bool = False) -> TPReport:
    """Split ``model`` (adapters injected, base frozen) over the 1-D ``mesh`` in place; see the module docstring.

    Raises:
        ValueError: no plan for this architecture, a layout the plan does not fit, or an
            adapter placement tensor parallelism cannot run (one line each).
    """
    report = TPReport()
    layer_plan, covered = _plan_layers(model, report, sequence_parallel)
    adapter_plan = _plan_adapters(model, report, covered)
    parallelize_module(model, mesh, {**layer_plan, **adapter_plan})
    _check_all_trainable_placed(model)
    _set_local_widths(model, mesh.size())
    _feed_prefix_heads(model, mesh)
    if sequence_parallel:
        from tunekit.distributed.sequence_parallel import apply_sequence_parallel

        apply_sequence_parallel(model, mesh)
    return report
