"""Activation and temporary memory, from a simulated training step of a few-block replica.

What a step keeps for backward depends on code, not just on the architecture:
fp32 copies inside RMSNorm, dropout masks of LoRA inputs, prefix keys and
values concatenated in every layer, the fp32 upcast of the logits in the loss,
the autocast weight cache, the inputs checkpointing keeps, the dequantized
weight a 4-bit layer builds in backward. So the estimate runs the real code:
the model of the run (same head, dtype, quantization, adapter, attention
implementation, dropout, checkpointing, autocast, loss) with 2 and 3 blocks,
under ``FakeTensorMode`` at the *target* batch and sequence length. Fake
tensors carry shapes, dtypes and devices but no data, so a step of a 70B-wide
block at 8k tokens costs nothing, and the CPU dispatch (SDPA's flash kernel
saves its output and log-sum-exp; eager attention materialises (B, H, T, T)
scores) is the real one. A ``TorchDispatchMode`` below the fake mode records
every storage an op creates and frees it when Python drops the last reference,
which is exactly what the allocator sees (tests compare it with the profiler's
allocation events of a real step, byte for byte).

From the two replicas, per block and the rest (embeddings, head, loss)::

    A(L) = A(2) + (L - 2) * (A(3) - A(2))       bytes alive at the end of forward
    P(L) = P(2) + (L - 2) * (P(3) - P(2))       peak during forward + backward

(for encoder-decoders the encoder and decoder depths are extrapolated
separately). Both are exactly linear in the depth: every block adds the same
saved tensors, and the peak sits at the same place (the loss backward, or the
first recomputed block with checkpointing). Gradients and parameters are left
out (the memory model counts them); ``temporaries = P(L) - A(L)``.

Data-dependent reads (``int(mask.sum())``) cannot be answered without data;
the simulation answers 1 / True, which only changes scalars.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tunekit.estimate.model import DTYPES, ModelSpec, build_model, num_layers, quant_state

__all__ = ["ActivationProfile", "StepShape", "StepTrace", "profile_activations", "simulate_step"]


@dataclass(frozen=True)
class StepShape:
    """The micro-batch and the training-step options that change activation memory."""

    batch: int = 1
    seq_len: int = 512
    target_len: int = 128
    """Decoder length of seq2seq rows (labels)."""
    packed: bool = False
    """Packed rows: position ids and no attention mask (tunekit's ``data.packing``)."""
    padded: bool = True
    """Unpacked rows come with an attention mask."""
    mixed_precision: str = "no"
    """no | bf16 | fp16: autocast dtype of the forward."""
    grad_checkpointing: bool = False
    fused_cross_entropy: bool = False


@dataclass(frozen=True)
class StepTrace:
    """Non-parameter, non-gradient bytes of one simulated step."""

    activations: int
    """Alive at the end of forward (saved for backward, checkpoint inputs, outputs)."""
    peak: int
    """Most alive at once during forward and backward."""
    peak_with_gradients: int = 0
    """The same counting the gradients as they appear (what an allocator sees)."""


@dataclass(frozen=True)
class ActivationProfile:
    """Activations and temporaries of the full-depth model (bytes, per micro-batch)."""

    activations: int
    temporaries: int
    per_block: dict[str, int]
    """Activation bytes each extra block adds, per stack (num_hidden_layers / num_decoder_layers)."""


class _LiveBytes(TorchDispatchMode):
    """Records the bytes of every storage ops create, until Python frees it.

    Storages are told apart by an allocation number: a freed storage's address
    (``_cdata``) is reused by later ones.
    """

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, tuple[int, int]] = {}  # storage address -> (allocation number, bytes)
        self.events: list[tuple[int, int]] = []  # (allocation number, +bytes on create / -bytes on free)
        self.recording = True

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.exclude:
            return
        self.live[key] = (len(self.events), storage.nbytes())
        self.events.append(self.live[key])
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        if self.recording:
            number, nbytes = self.live.pop(key)
            self.events.append((number, -nbytes))

    def allocation(self, tensor: torch.Tensor) -> int | None:
        """The allocation number of a live tensor's storage (None if not created under this mode)."""
        entry = self.live.get(tensor.untyped_storage()._cdata)
        return entry[0] if entry else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return _placeholder_scalar(args[0].dtype)
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out

    def mark(self) -> int:
        return len(self.events)

    def replay(self, skip: set[int], upto: int | None = None) -> tuple[int, int]:
        """(bytes alive after event ``upto``, peak) counting allocations not in ``skip``."""
        live = peak = 0
        for number, delta in self.events[:upto]:
            if number not in skip:
                live += delta
                peak = max(peak, live)
        return live, peak


def _placeholder_scalar(dtype: torch.dtype) -> Any:
    if dtype == torch.bool:
        return True
    return 1 if not dtype.is_floating_point else 1.0


def _fake_like(t: torch.Tensor, mode: Any) -> torch.Tensor:
    with mode:
        return torch.empty(t.shape, dtype=t.dtype)


def _fakeify(model: nn.Module, mode: Any, quantization: Any) -> None:
    """Replace every meta parameter and buffer by a fake CPU tensor (tied ones stay tied)."""
    memo: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in memo:
                fake = nn.Parameter(_fake_like(param, mode), requires_grad=param.requires_grad)
                state = getattr(param, "quant_state", None)
                if state is not None:
                    with mode:
                        fake.quant_state = quant_state(tuple(state.shape), quantization,
                                                       lambda s, d: torch.empty(s, dtype=d))
                if getattr(param, "SCB", None) is not None:  # LLM.int8: int8 rows + per-row scales
                    fake.CB, fake.SCB = fake, _fake_like(param.SCB, mode)
                memo[id(param)] = fake
            module._parameters[name] = memo[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = _fake_like(buf, mode)


def _batch(task: str, shape: StepShape) -> dict[str, torch.Tensor]:
    """A collated micro-batch of the task's keys (made inside the simulation, as the trainer makes it)."""
    b, t = shape.batch, shape.seq_len
    batch = {"input_ids": torch.zeros(b, t, dtype=torch.long)}
    if shape.packed and task == "causal_lm":
        batch["position_ids"] = torch.zeros(b, t, dtype=torch.long)
    elif shape.padded:
        batch["attention_mask"] = torch.ones(b, t, dtype=torch.long)
    if task == "seq_cls":
        batch["labels"] = torch.zeros(b, dtype=torch.long)
    elif task == "seq2seq":
        batch["labels"] = torch.zeros(b, shape.target_len, dtype=torch.long)
    else:
        batch["labels"] = torch.zeros(b, t, dtype=torch.long)
    return batch


def _enable_checkpointing(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; drop it")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers 5.x name; the older one is a deprecated alias
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], shape: StepShape) -> torch.Tensor:
    """The step's loss. The simulated labels are all targets, so the model's own loss (logits on every
    position) costs what the trainer's target-position head does, to one position a row."""
    if shape.fused_cross_entropy:
        from tunekit.models.heads import dense_targets
        from tunekit.models.kernels import fused_causal_lm_loss

        with dense_targets():  # static shapes on fake tensors
            return fused_causal_lm_loss(model, batch)
    kwargs = {"use_cache": False} if shape.packed else {}
    return model(**batch, **kwargs).loss


def simulate_step(model: nn.Module, task: str, shape: StepShape, quantization: Any = None) -> StepTrace:
    """Run one forward + backward of a meta-device ``model`` on fake tensors; measure its live bytes.

    The model is converted in place (its tensors become fake); use a fresh build per call.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if shape.grad_checkpointing:
        _enable_checkpointing(model)
    mode = FakeTensorMode()
    _fakeify(model, mode, quantization)
    model.train()
    exclude = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    tracker = _LiveBytes(exclude)
    autocast = (torch.autocast("cpu", dtype=DTYPES[shape.mixed_precision]) if shape.mixed_precision != "no"
                else contextlib.nullcontext())
    with mode, tracker:
        batch = _batch(task, shape)
        with autocast:
            loss = _loss(model, batch, shape)
        forward_end = tracker.mark()
        loss.backward()
        del loss, batch
    grads = {tracker.allocation(p.grad) for p in model.parameters() if p.grad is not None}
    tracker.recording = False
    activations, _ = tracker.replay(grads, upto=forward_end)
    _, peak = tracker.replay(grads)
    rng = _checkpoint_rng_bytes(model) if shape.grad_checkpointing else 0
    return StepTrace(activations + rng, peak + rng, tracker.replay(set())[1] + rng)


def _checkpoint_rng_bytes(model: nn.Module) -> int:
    """Bytes of the RNG states checkpointing keeps from each block's forward to its recomputation.

    ``torch.utils.checkpoint`` (``preserve_rng_state``) stores ``torch.get_rng_state()``, a
    real tensor made outside any op, so the tracker does not see it; it is small and the
    same for every block.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())
    return blocks * torch.get_rng_state().nbytes


def _depths(spec: ModelSpec) -> tuple[dict[str, int], list[str]]:
    """Base depth 2 per stack: the first block is not a steady-state one (it reads the embeddings),
    and with two blocks every kind of an alternating model (Gemma 2's sliding / full) has its mask."""
    stacks = list(num_layers(spec.config))
    return {s: 2 for s in stacks}, stacks


_PROFILES: dict[tuple, ActivationProfile] = {}  # the planner asks again for every layout and every fix


def _key(spec: ModelSpec, shape: StepShape, tp: int) -> tuple:
    return (spec.config.to_json_string(use_diff=False), spec.task, spec.dtype, repr(spec.quantization),
            repr(spec.adapter), spec.attn, spec.num_labels, spec.kernels, shape, tp)


def profile_activations(spec: ModelSpec, shape: StepShape, tp: int = 1) -> ActivationProfile:
    """Activations and temporaries of ``spec`` at ``shape`` (one tensor-parallel rank's when ``tp`` > 1).

    Results are kept per (model, shape, tp) for the life of the process.
    """
    key = _key(spec, shape, tp)
    if key not in _PROFILES:
        if len(_PROFILES) >= 256:
            _PROFILES.clear()
        _PROFILES[key] = _profile(spec, shape, tp)
    return _PROFILES[key]


def _profile(spec: ModelSpec, shape: StepShape, tp: int) -> ActivationProfile:
    base, stacks = _depths(spec)
    full = num_layers(spec.config)

    def run(layers: dict[str, int]) -> StepTrace:
        model = build_model(spec, layers=layers, tp=tp)
        try:
            return simulate_step(model, spec.task, shape, spec.quantization)
        except ValueError:  # the run cannot work as set up (no checkpointing support, fused loss + soft-capping)
            raise
        except Exception as err:  # noqa: BLE001 - code the simulation runs, not the user's input, failed
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise RuntimeError(f"the training step of this {spec.config.model_type} model could not be simulated "
                               f"on fake tensors ({type(err).__name__}: {first}); try another --attn, or report "
                               "it with --debug's traceback") from err

    ref = run(base)
    activations, peak, per_block = ref.activations, ref.peak, {}
    for stack in stacks:
        deeper = run({**base, stack: base[stack] + 1})
        d_act, d_peak = deeper.activations - ref.activations, deeper.peak - ref.peak
        extra = full[stack] - base[stack]
        activations += extra * d_act
        peak += extra * d_peak
        per_block[stack] = d_act
    return ActivationProfile(activations, max(0, peak - activations), per_block)
