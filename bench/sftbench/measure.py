"""What is measured in every contender, by the same code: batches, time, memory, FLOPs, eval loss.

Training FLOPs (``train_flops``). Only matmuls count (norms, RoPE, softmax, SiLU and the
optimizer are not model FLOPs); a multiply-add is 2 FLOPs. Per layer the seven
projections q, k, v, o (H -> H, H -> KV·D, H -> KV·D, H -> H) and gate, up, down
(H -> I, H -> I, I -> H) are frozen, each with a LoRA branch of rank r. With N real
(non-padding) tokens, sequences of lengths L_s, P positions whose next token is a
target, and ``W = Σ in·out``, ``R = Σ r·(in + out)`` over the seven projections::

    frozen projections   4 · N · layers · W         forward 2 + input gradient 2 (no weight gradient)
                       - 2 · N · (H·H + 2·H·KV·D)   layer 0's q, k, v need no input gradient
    LoRA branches        6 · N · layers · R         forward 2 + weight gradients 2 + input gradients 2
                       - 2 · N · 3 · r·H            layer 0's A need no input gradient
    attention           12 · H · layers · Σ_s L_s(L_s + 1)/2
                                                    causal pairs of each sequence alone: QKᵀ and PV
                                                    forward (4), dQ, dK, dV, dP backward (8)
    LM head              4 · H · V · P              forward + input gradient, on target positions only

Padding, attention across packed neighbours, masked-out halves of T×T scores, the LM
head on prompt positions and recomputation are work that a contender may do, but none of
it is counted: MFU is the useful work per second over the machine's matmul rate
(``matmul_rate``, measured in the same session at the model's GEMM shapes).
``tests/tunekit/test_bench_sft.py`` checks the formula against
``torch.utils.flop_counter`` on a real forward + backward.
"""

from __future__ import annotations

import hashlib
import resource
import time
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


def train_flops(arch: dict, lengths: list[int], head_positions: int, rank: int, *, causal: bool = True) -> float:
    """Model FLOPs of one forward + backward over sequences of ``lengths`` (see the module docstring).

    Args:
        arch: ``hidden``, ``layers``, ``heads``, ``kv_heads``, ``intermediate``, ``vocab``.
        lengths: tokens of every sequence (real tokens only).
        head_positions: positions the LM head must score (those whose next token is a target).
        rank: LoRA rank on all seven projections.
        causal: count causal pairs L(L+1)/2 (True) or the full L² (for a check against a counter).
    """
    h, layers, v, inter = arch["hidden"], arch["layers"], arch["vocab"], arch["intermediate"]
    kv = arch["kv_heads"] * h // arch["heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    tokens = sum(lengths)
    frozen = 4 * tokens * layers * sum(i * o for i, o in shapes) - 2 * tokens * (h * h + 2 * h * kv)
    lora = 6 * tokens * layers * sum(rank * (i + o) for i, o in shapes) - 2 * tokens * 3 * rank * h
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    return float(frozen + lora + 12 * h * layers * pairs + 4 * h * v * head_positions)


def matmul_rate(arch: dict, tokens: int = 1024, min_seconds: float = 0.3) -> dict:
    """fp32 ``a @ b`` FLOP/s at the model's GEMM shapes (tokens × in × out), per CPU second and wall second.

    The rate is the best shape's: the most this machine gives a matmul of this model.
    """
    h, inter, v = arch["hidden"], arch["intermediate"], arch["vocab"]
    out = {"shapes": []}
    for m, k, n in ((tokens, h, h), (tokens, h, inter), (tokens, inter, h), (tokens, h, v)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up: allocation, thread pool
        reps, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
        while time.process_time() - cpu0 < min_seconds:
            a @ b
            reps += 1
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        flops = 2.0 * m * k * n * reps
        out["shapes"].append({"mkn": [m, k, n], "flops_per_cpu_s": flops / cpu, "flops_per_wall_s": flops / wall})
    out["flops_per_cpu_s"] = max(s["flops_per_cpu_s"] for s in out["shapes"])
    out["flops_per_wall_s"] = max(s["flops_per_wall_s"] for s in out["shapes"])
    return out


def _as_list(x) -> list[int]:
    return x.tolist() if torch.is_tensor(x) else list(x)


def split_sequences(row: dict) -> list[tuple[list[int], list[int]]]:
    """The examples in one collator input row: (input_ids, labels) per packed sequence (or the row)."""
    ids = _as_list(row["input_ids"])
    labels = _as_list(row.get("labels", ids))
    if "seq_lengths" in row:  # TRL packed rows
        lengths = _as_list(row["seq_lengths"])
    elif "position_ids" in row:  # tunekit packed rows: positions restart at 0 per example
        starts = [i for i, p in enumerate(_as_list(row["position_ids"])) if p == 0] + [len(ids)]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    else:
        lengths = [len(ids)]
    out, at = [], 0
    for n in lengths:
        out.append((ids[at: at + n], labels[at: at + n]))
        at += n
    return out


class BatchRecorder:
    """Wraps a collate function; keeps every row it batches (processed after training: no timed cost)."""

    def __init__(self) -> None:
        self.rows: list[list[dict]] = []
        self.slots = 0

    def wrap(self, collate):
        def recording_collate(rows):
            with torch.profiler.record_function("collate"):
                batch = collate(rows)
            self.rows.append(rows)
            self.slots += batch["input_ids"].numel()
            return batch
        return recording_collate

    def summary(self) -> dict:
        """Sequences, real tokens, token slots, targets, attention pairs and a fingerprint of the examples."""
        lengths, targets, keys = [], 0, []
        for rows in self.rows:
            for row in rows:
                for ids, labels in split_sequences(row):
                    # label 0 of a sequence is never a target (the model shifts); packers also set it to -100
                    mask = tuple(label != IGNORE_INDEX for label in labels[1:])
                    lengths.append(len(ids))
                    targets += sum(mask)
                    keys.append(hashlib.sha1(repr((ids, mask)).encode()).hexdigest())
        real = sum(lengths)
        return {"micro_batches": len(self.rows), "sequences": len(lengths), "real_tokens": real,
                "slots": self.slots, "padding_pct": 100.0 * (1 - real / max(1, self.slots)), "targets": targets,
                "lengths": lengths, "examples_sha": hashlib.sha1("".join(sorted(keys)).encode()).hexdigest()[:16]}


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class TrainMeter:
    """CPU and wall seconds, peak memory and memory added between ``start()`` and ``stop()``."""

    cpu_s: float = 0.0
    wall_s: float = 0.0
    peak_rss_mib: float = 0.0
    train_rss_mib: float = 0.0
    peak_cuda_mib: float | None = None
    train_cuda_mib: float | None = None
    _t0: tuple = field(default=(), repr=False)

    def start(self) -> None:
        before_peak = _status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        reset = _reset_peak_rss()
        rss = _status_mib("VmRSS") if reset else before_peak
        cuda = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None
        if cuda is not None:
            torch.cuda.reset_peak_memory_stats()
        self._t0 = (time.process_time(), time.perf_counter(), before_peak, rss, cuda)

    def stop(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        cpu0, wall0, before_peak, rss0, cuda0 = self._t0
        self.cpu_s, self.wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        peak = _status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak_rss_mib, self.train_rss_mib = max(peak, before_peak), peak - rss0
        if cuda0 is not None:
            self.peak_cuda_mib = torch.cuda.max_memory_allocated() / 2**20
            self.train_cuda_mib = self.peak_cuda_mib - cuda0


def _padded(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def heldout_loss(base_dir: str, examples: list[dict], adapter_dir: str | None = None, batch: int = 8) -> float:
    """Mean next-token loss over the targets of ``examples``: the base (SDPA, fp32) plus the saved adapter.

    The one evaluation every contender's adapter goes through: loaded from disk with PEFT
    (tunekit saves PEFT's format), padded batches, summed cross-entropy / number of targets.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch):
        inputs = {k: v.to(device) for k, v in _padded(examples[start: start + batch], 0).items()}
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        labels = inputs["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).double(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return total / count
