"""Which strategy fits: every layout the project can run, its per-GPU peak, and a recommendation.

``plan(spec, settings, devices)`` is a pure function of the model, the run and
the hardware; ``recommend`` is the answer ``distributed.strategy: auto`` needs.
Candidates, cheapest first (the recommendation is the first that fits, so
nothing offloads while something without offload fits, and tensor
parallelism stays inside a node)::

    none (1 GPU) | ddp | fsdp reshard_after_forward=false (ZeRO-2-like) | fsdp (ZeRO-3) | deepspeed (ZeRO-3)
    | fsdp_tp (dp x tp, tp dividing the heads, tp <= GPUs per node) | tp | fsdp + cpu_offload
    | deepspeed + cpu_offload

A layout fits when its peak is at most the GPU memory less ``headroom`` (CUDA
context, allocator fragmentation) and, with offload, the host memory holds the
offloaded states. The peak of a step is the larger of two moments::

    backward:        model states + activations + temporaries (backward scratch, gathered FSDP units)
    optimizer step:  model states + the optimizer's scratch

counting every gradient as alive (true from the second micro-batch of an
accumulation window on) and the optimizer state as allocated (every step after
the first).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from tunekit.estimate.activations import ActivationProfile, StepShape, profile_activations
from tunekit.estimate.memory import RankBytes, optimizer_step_transient, rank_model_states
from tunekit.estimate.model import Inventory, ModelSpec, build_model, inventory, tp_divisibility_error, tp_placements
from tunekit.estimate.storage import optimizer_state_bytes
from tunekit.estimate.units import GiB, format_bytes

__all__ = ["Breakdown", "Devices", "Layout", "LayoutFilter", "Plan", "Recommendation", "RunSettings", "plan",
           "recommend"]


@dataclass(frozen=True)
class Devices:
    """The hardware a run may use."""

    count: int = 1
    """GPUs in all (ranks)."""
    memory: int = 80 * GiB
    """Memory of one GPU, bytes."""
    host_memory: int | None = None
    """Host memory of one node, bytes (None: not checked)."""
    per_node: int = 8
    """GPUs per node (tensor parallelism stays inside one)."""
    kind: str = "cuda"
    """cuda | cpu: decides the optimizer's kernels (foreach on GPUs)."""
    headroom: float = 0.1
    """Share of each memory kept free."""

    @classmethod
    def detect(cls, headroom: float = 0.1, *, processes: int | None = None, per_node: int | None = None) -> Devices:
        """The devices of this machine, or of a job of ``processes`` ranks, ``per_node`` on each node.

        With CUDA: one GPU per rank (default: every GPU here), each as large as the smallest
        GPU of this node. Without: the job's CPU processes (default one), which share this
        node's memory (each gets 1/``per_node`` of it; CPU offload draws on the whole).
        """
        import torch

        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        if torch.cuda.is_available():
            count = processes or torch.cuda.device_count()
            memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
            return cls(count, memory, host, per_node or count, "cuda", headroom)
        count = processes or 1
        local = per_node or count
        return cls(count, (host or 0) // local, host, local, "cpu", headroom)

    @property
    def usable(self) -> int:
        return int(self.memory * (1 - self.headroom))

    @property
    def host_usable(self) -> int | None:
        return None if self.host_memory is None else int(self.host_memory * (1 - self.headroom))

    @property
    def ranks_per_node(self) -> int:
        return min(self.count, self.per_node)


@dataclass(frozen=True)
class RunSettings:
    """The training options that change memory, besides the model."""

    shape: StepShape = StepShape()
    optimizer: str = "adamw"
    grad_accum_steps: int = 1


@dataclass(frozen=True)
class Layout:
    """One way to run: ``distributed`` config values."""

    strategy: str = "none"
    cpu_offload: bool = False
    tp_size: int = 1
    reshard_after_forward: bool = True

    @property
    def label(self) -> str:
        names = {"none": "single GPU", "ddp": "DDP", "deepspeed": "DeepSpeed ZeRO-3", "tp": f"TP x{self.tp_size}"}
        if self.strategy == "fsdp":
            name = "FSDP2 ZeRO-3" if self.reshard_after_forward else "FSDP2 ZeRO-2-like (no reshard after forward)"
        elif self.strategy == "fsdp_tp":
            name = f"FSDP2 ZeRO-3 x TP x{self.tp_size}"
        else:
            name = names[self.strategy]
        return name + (" + CPU offload" if self.cpu_offload else "")

    def config(self) -> dict[str, Any]:
        """The ``distributed:`` section that runs this layout."""
        out: dict[str, Any] = {"strategy": self.strategy}
        if self.cpu_offload:
            out["cpu_offload"] = True
        if self.tp_size > 1:
            out["tp_size"] = self.tp_size
        if self.strategy == "fsdp" and not self.reshard_after_forward:
            out["reshard_after_forward"] = False
        return out


@dataclass(frozen=True)
class Breakdown:
    """Bytes one GPU (rank 0) holds at the step's peak, by kind, under one layout."""

    layout: Layout
    frozen: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    temporaries: int
    host: int
    """Host memory per node the layout needs for offloaded states (0 without offload)."""
    phase: str
    """backward | optimizer step: where the peak is."""
    fits: bool
    note: str = ""
    supported: bool = True

    @property
    def peak(self) -> int:
        return self.frozen + self.trainable + self.gradients + self.optimizer + self.activations + self.temporaries

    def terms(self) -> dict[str, int]:
        return {"frozen weights": self.frozen, "trainable weights": self.trainable, "gradients": self.gradients,
                "optimizer states": self.optimizer, "activations": self.activations,
                "temporaries": self.temporaries}


@dataclass(frozen=True)
class Recommendation:
    """What ``distributed.strategy: auto`` should run, and why."""

    layout: Layout | None
    """None when nothing fits."""
    reason: str


@dataclass
class Plan:
    """Every candidate layout, the recommendation and, when nothing fits, what would."""

    model: dict[str, Any]
    rows: list[Breakdown]
    recommended: Breakdown | None
    reason: str
    advice: list[str] = field(default_factory=list)
    devices: Devices = Devices()
    settings: RunSettings = RunSettings()


LayoutFilter = Callable[[Layout, "Devices"], bool]
"""Which layouts a caller can run on given devices (``distributed.strategy: auto``: what this job can start)."""


def candidate_layouts(config: Any, devices: Devices, tp_sizes: list[int] | None = None) -> list[Layout]:
    """Layouts for ``devices``, cheapest first (``tp_sizes`` restricts the tensor-parallel degrees)."""
    n = devices.count
    if n == 1:
        return [Layout("none"), Layout("fsdp", cpu_offload=True), Layout("deepspeed", cpu_offload=True)]
    degrees = [t for t in range(2, min(n, devices.per_node) + 1) if n % t == 0]
    degrees = [t for t in degrees if tp_divisibility_error(config, t) is None and (tp_sizes is None or t in tp_sizes)]
    rows = [Layout("ddp"), Layout("fsdp", reshard_after_forward=False), Layout("fsdp"), Layout("deepspeed")]
    rows += [Layout("fsdp_tp", tp_size=t) for t in degrees if t < n]
    rows += [Layout("tp", tp_size=n)] if n in degrees else []
    return rows + [Layout("fsdp", cpu_offload=True), Layout("deepspeed", cpu_offload=True)]


@dataclass
class _Context:
    """What every layout's breakdown reads: the model, its inventory and activations by TP degree."""

    spec: ModelSpec
    settings: RunSettings
    devices: Devices
    inv: Inventory
    placements: dict[str, str]
    profiles: dict[int, ActivationProfile] = field(default_factory=dict)

    def activations(self, tp: int) -> ActivationProfile:
        if tp not in self.profiles:
            self.profiles[tp] = profile_activations(self.spec, self.settings.shape, tp=tp)
        return self.profiles[tp]

    def states(self, dp: int = 1, tp: int = 1) -> RankBytes:
        return rank_model_states(self.inv, self.settings.optimizer, dp=dp, tp=tp, placements=self.placements)

    def units(self, tp: int = 1) -> tuple[int, int, int]:
        """(root unit bytes, largest block unit bytes, largest block's trainable bytes), per TP rank."""
        every, trained = self.inv.unit_bytes(), self.inv.unit_bytes(trainable_only=True)
        root = every.pop("", 0)
        trained.pop("", None)
        return root // tp, max(every.values(), default=0) // tp, max(trained.values(), default=0) // tp


def _unsupported(layout: Layout, ctx: _Context) -> str | None:
    quantized = ctx.spec.quantization is not None
    if quantized and layout.strategy == "deepspeed":
        return "DeepSpeed ZeRO-3 cannot partition bitsandbytes-quantized weights"
    if quantized and layout.strategy in ("tp", "fsdp_tp"):
        return "DTensor tensor parallelism cannot split bitsandbytes-quantized weights"
    if layout.strategy in ("tp", "fsdp_tp"):
        return tp_divisibility_error(ctx.spec.config, layout.tp_size)
    return None


def _deepspeed_states(ctx: _Context) -> RankBytes:
    """DeepSpeed's ZeRO-3 accounting (see ``memory``), per rank: fp32 master weights, gradients and moments."""
    n, inv = ctx.devices.count, ctx.inv
    half = ctx.settings.shape.mixed_precision != "no" or ctx.spec.dtype != "fp32"
    copy = 2 if half else 0  # the fp16/bf16 working copy beside the fp32 master weights
    fp32_trainable = [(p.numel, torch.float32) for p in inv.params if p.trainable]
    optimizer = optimizer_state_bytes(fp32_trainable, ctx.settings.optimizer)
    return RankBytes((2 if half else 4) * (inv.total - inv.trainable) // n, (copy + 4) * inv.trainable // n,
                     4 * inv.trainable // n, optimizer // n)


def _states_and_comm(layout: Layout, ctx: _Context) -> tuple[RankBytes, int, int]:
    """(device model states, communication / gathered-unit bytes in backward, host bytes per node)."""
    n, t = ctx.devices.count, layout.tp_size
    if layout.strategy == "deepspeed":
        states = _deepspeed_states(ctx)
        gathered = 4 * ctx.inv.largest_layer_params
        if layout.cpu_offload:
            host = 1.5 * states.total * ctx.devices.ranks_per_node  # DeepSpeed's buffer factor
            return RankBytes(0, 0, 0, 0), gathered, int(host)
        return states, gathered, 0
    if layout.strategy in ("none", "ddp", "tp"):
        states = ctx.states(tp=t)
        if layout.strategy == "ddp":  # reducer buckets: a second copy of the gradients
            states = replace(states, gradients=2 * states.gradients)
        return states, 0, 0
    dp = n // t
    states, (root, block, block_trained) = ctx.states(dp=dp, tp=t), ctx.units(t)
    if not layout.reshard_after_forward:  # every unit stays gathered beside its shard
        full = ctx.states()
        return replace(states, frozen=states.frozen + full.frozen, trainable=states.trainable + full.trainable), \
            block_trained, 0
    comm = root + 2 * block + block_trained
    if layout.cpu_offload:
        return RankBytes(0, 0, 0, 0), comm, states.total * ctx.devices.ranks_per_node
    return states, comm, 0


def breakdown(layout: Layout, ctx: _Context) -> Breakdown:
    """The per-GPU peak of ``layout``."""
    reason = _unsupported(layout, ctx)
    if reason:
        return Breakdown(layout, 0, 0, 0, 0, 0, 0, 0, "", False, reason, supported=False)
    states, comm, host = _states_and_comm(layout, ctx)
    acts = ctx.activations(layout.tp_size)
    shard = ctx.devices.count if layout.strategy in ("fsdp", "deepspeed", "fsdp_tp") else layout.tp_size
    step_scratch = 0 if layout.cpu_offload else optimizer_step_transient(
        ctx.inv, ctx.settings.optimizer, ctx.devices.kind, shard)
    backward_extra = acts.activations + acts.temporaries + comm
    if backward_extra >= step_scratch:
        phase, activations, temporaries = "backward", acts.activations, acts.temporaries + comm
    else:
        phase, activations, temporaries = "optimizer step", 0, step_scratch
    row = Breakdown(layout, states.frozen, states.trainable, states.gradients, states.optimizer, activations,
                    temporaries, host, phase, False)
    host_ok = not host or ctx.devices.host_usable is None or host <= ctx.devices.host_usable
    return replace(row, fits=row.peak <= ctx.devices.usable and host_ok, note=_note(layout, ctx))


def _note(layout: Layout, ctx: _Context) -> str:
    if layout.strategy == "ddp":
        return "gradients doubled: DDP's reducer buckets (gradient_as_bucket_view=true avoids the copy)"
    if layout.cpu_offload:
        return "sharded weights, gradients and optimizer states in host memory; the optimizer steps on the CPU"
    if ctx.settings.optimizer == "paged_adamw_8bit":
        return "paged optimizer state can spill to host memory under pressure"
    return ""


def _summary(spec: ModelSpec, inv: Inventory) -> dict[str, Any]:
    storage = sorted({p.storage for p in inv.params if not p.trainable} - {"dense"})
    return {"model_type": spec.config.model_type, "origin": spec.origin, "task": spec.task,
            "method": "dora" if getattr(spec.adapter, "use_dora", False) else getattr(spec.adapter, "method", "full"),
            "dtype": spec.dtype,
            "quantized": ", ".join(storage) or None, "parameters": inv.total, "trainable": inv.trainable,
            "frozen_bytes": inv.frozen_bytes, "trainable_bytes": inv.trainable_bytes}


def plan(spec: ModelSpec, settings: RunSettings, devices: Devices, *, tp_sizes: list[int] | None = None,
         advise: bool = True, allowed: LayoutFilter | None = None) -> Plan:
    """Every candidate layout's per-GPU peak for ``spec`` trained as ``settings`` on ``devices``.

    ``allowed`` keeps only the layouts it accepts (rows, recommendation and advice alike).

    Raises:
        ValueError: the model cannot be built as described (unknown task head, adapter
            that matches nothing, a TP degree in ``tp_sizes`` that does not divide the heads).
    """
    for t in tp_sizes or []:
        error = tp_divisibility_error(spec.config, t)
        if error:
            raise ValueError(error)
    model = build_model(spec)
    ctx = _Context(spec, settings, devices, inventory(model), tp_placements(model))
    layouts = [l for l in candidate_layouts(spec.config, devices, tp_sizes) if allowed is None or allowed(l, devices)]
    rows = [breakdown(layout, ctx) for layout in layouts]
    chosen = next((row for row in rows if row.fits), None)
    result = Plan(_summary(spec, ctx.inv), rows, chosen, _reason(rows, chosen, devices), [], devices, settings)
    if chosen is None and advise:
        from tunekit.estimate.advice import advise as advise_fixes

        result.advice = advise_fixes(result, spec, allowed)
    return result


def _reason(rows: list[Breakdown], chosen: Breakdown | None, devices: Devices) -> str:
    budget = f"{format_bytes(devices.usable)} usable per GPU ({format_bytes(devices.memory)} less " \
             f"{devices.headroom:.0%} headroom)"
    if chosen is None:
        best = min((r for r in rows if r.supported), key=lambda r: r.peak, default=None)
        if best is None:
            return "no layout can run this model on these devices"
        return f"nothing fits in {budget}: the smallest peak is {best.layout.label} at {format_bytes(best.peak)}"
    skipped = [r for r in rows[: rows.index(chosen)] if r.supported]
    why = "; ".join(f"{r.layout.label} needs {format_bytes(r.peak)}" for r in skipped)
    reason = f"{chosen.layout.label}: peak {format_bytes(chosen.peak)} per GPU fits in {budget}"
    return reason + (f" (cheaper layouts do not: {why})" if why else "")


def recommend(spec: ModelSpec, settings: RunSettings, devices: Devices,
              allowed: LayoutFilter | None = None) -> Recommendation:
    """The cheapest layout (among those ``allowed``) that fits (None when nothing does), with the reason in one line."""
    result = plan(spec, settings, devices, allowed=allowed)
    reason = result.reason + ("; " + "; ".join(result.advice) if result.advice else "")
    return Recommendation(result.recommended.layout if result.recommended else None, reason)


def plan_as_dict(result: Plan) -> dict[str, Any]:
    """JSON-ready plan (bytes as integers)."""
    rows = []
    for row in result.rows:
        entry = {"layout": row.layout.config(), "label": row.layout.label, "supported": row.supported,
                 "fits": row.fits, "peak": row.peak, "phase": row.phase, "host": row.host, "note": row.note}
        entry.update({k.replace(" ", "_"): v for k, v in row.terms().items()})
        rows.append(entry)
    return {"model": result.model, "devices": asdict(result.devices),
            "settings": {"optimizer": result.settings.optimizer, **asdict(result.settings.shape)},
            "rows": rows, "recommended": result.recommended.layout.config() if result.recommended else None,
            "reason": result.reason, "advice": result.advice}
