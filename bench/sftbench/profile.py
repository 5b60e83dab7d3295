"""Where the time goes: ``torch.profiler`` over one training window, grouped by what the time is for.

``--profile NAME`` runs contender NAME (``tunekit:packing``, ...) in this process with the
profiler on for its whole training loop; ``--profile fixed`` does the same for
``bench/train.py``'s fixed-length tunekit job (after its warm-up steps). Every profiler
event's self time goes to one category:

- matmuls (``aten::mm``/``addmm``/``bmm``) by their shapes: a dimension equal to the vocabulary is
  the LM head, one equal to the LoRA rank a LoRA branch, the rest the frozen projections;
- SDPA ops (forward and backward) are the attention kernel; log-softmax / NLL / cross-entropy
  ops (and their backward) the loss;
- other ops by the innermost range around them: ranges opened by global module hooks
  (attention modules, MLPs, norms, linear wrappers, and "mask + RoPE setup" from the model body's
  start to its first layer), autograd's backward nodes, ``collate`` (the bench's collate
  wrapper), ``Optimizer.*`` (torch's own), ``clip_grad_norm_`` (wrapped here);
- Python time inside a range is the range's self time, in the range's category; time outside
  every op and range is "trainer loop, Python", computed as the window's CPU time minus the rest.

It also counts host syncs per micro-batch (``aten::_local_scalar_dense``: ``.item()``, ``float()``,
``int()`` of a tensor) and ``aten::nonzero`` calls (data-dependent shapes: a sync on a GPU).
``--tokenize-rows N`` times data preparation instead: tunekit's ``build_dataset`` (row-wise without
the cache, unpacked and packed; a cache miss with 1 and 2 encoding processes; a cache hit) against a
batched ``datasets.map`` with the same fast tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, record_function

from .contenders import tunekit_config
from .measure import TrainMeter
from .workload import encode, generate_rows, workspace

_MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"}
_LOSS = ("log_softmax", "nll_loss", "cross_entropy", "logsumexp", "NllLoss", "LogSoftmax", "CrossEntropy")
_MODULE_RANGES = {"Attention": "attention: rest (RoPE, reshapes, per-layer masks, cu_seqlens)",
                  "MLP": "norms, activations, residuals (fwd)", "RMSNorm": "norms, activations, residuals (fwd)",
                  "Linear": "linear/LoRA module overhead (fwd)", "LoRA": "linear/LoRA module overhead (fwd)"}
_SETUP = "mask + RoPE setup (once per forward)"
_RANGES = {"collate": "collate", "clip_grad_norm": "grad-norm clip", "Optimizer.": "optimizer step + zero_grad",
           "setup": _SETUP}


def _module_label(module: torch.nn.Module) -> str | None:
    """The range (category) name of a module, by its class name."""
    name = type(module).__name__
    return next((label for key, label in _MODULE_RANGES.items() if key in name), None)


@contextlib.contextmanager
def module_ranges():
    """Global forward hooks: a profiler range per attention / MLP / norm / linear module, and the setup range."""
    stack: list = []
    state = {"setup": None}

    def pre(module, args):
        if hasattr(module, "layers") and hasattr(module, "embed_tokens"):  # the model body starts
            state["setup"] = record_function("setup").__enter__()
        elif state["setup"] is not None and type(module).__name__.endswith("DecoderLayer"):
            state["setup"].__exit__(None, None, None)
            state["setup"] = None
        label = _module_label(module)
        if label is not None:
            stack.append((module, record_function(label).__enter__()))

    def post(module, args, output):
        if stack and stack[-1][0] is module:
            stack.pop()[1].__exit__(None, None, None)

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
               torch.nn.modules.module.register_module_forward_hook(post)]
    clip = torch.nn.utils.clip_grad_norm_

    def timed_clip(*args, **kwargs):
        with record_function("clip_grad_norm"):
            return clip(*args, **kwargs)
    torch.nn.utils.clip_grad_norm_ = timed_clip
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        for handle in handles:
            handle.remove()


def _matmul_category(event, vocab: int, rank: int) -> str:
    dims = {d for shape in event.input_shapes for d in shape}
    if vocab in dims:
        return "LM head matmuls"
    return "LoRA matmuls" if rank in dims else "frozen projection matmuls"


def _range_category(event) -> str:
    """The category of the innermost known range around ``event`` (itself included)."""
    while event is not None:
        name = event.name
        if name.startswith("autograd::engine::evaluate_function:"):
            node = name.split(":")[-1]
            if "ScaledDotProduct" in node:
                return "attention kernel (SDPA fwd+bwd)"
            if any(key in node for key in _LOSS):
                return "loss (log-softmax + NLL, fwd+bwd)"
            return "autograd: elementwise grads + bookkeeping (bwd)"
        for prefix, category in _RANGES.items():
            if name.startswith(prefix):
                return category
        if name in _MODULE_RANGES.values():
            return name
        event = event.cpu_parent
    return "trainer loop, Python"


def categorize(prof, vocab: int, rank: int, window_s: float, micro_batches: int, steps: int) -> dict:
    """Self time per category (ms per optimizer step and %), host syncs per micro-batch (by category), top ops.

    Profiler times are host wall-clock durations (its "CPU time"), so ``window_s`` is the window's
    wall time; on a loaded machine every figure stretches alike and the percentages still hold.
    """
    times: dict[str, float] = defaultdict(float)
    ops: Counter = Counter()
    syncs: Counter = Counter()
    for event in prof.events():
        name = event.name
        ops[name] += 1
        if name == "aten::_local_scalar_dense":
            syncs[_range_category(event)] += 1
        if name in _MATMULS:
            category = _matmul_category(event, vocab, rank)
        elif "scaled_dot_product" in name:
            category = "attention kernel (SDPA fwd+bwd)"
        elif name.startswith("aten::") and any(key in name for key in _LOSS):
            category = "loss (log-softmax + NLL, fwd+bwd)"
        else:
            category = _range_category(event)
        times[category] += event.self_cpu_time_total / 1e6
    traced = sum(times.values())
    times["trainer loop, Python"] += max(0.0, window_s - traced)
    total = sum(times.values())
    rows = [{"category": k, "ms_per_step": 1e3 * v / steps, "pct": 100 * v / total}
            for k, v in sorted(times.items(), key=lambda kv: -kv[1])]
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    return {"categories": rows, "total_cpu_s": total, "steps": steps, "micro_batches": micro_batches,
            "syncs_per_micro_batch": ops["aten::_local_scalar_dense"] / micro_batches,
            "syncs_by_category": {k: v / micro_batches for k, v in syncs.most_common()},
            "nonzero_per_micro_batch": ops["aten::nonzero"] / micro_batches,
            "top_ops": [{"op": e.key, "calls": e.count, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
                        for e in top]}


class ProfilingMeter(TrainMeter):
    """A TrainMeter that also runs the profiler (and the module ranges) over its window."""

    def start(self) -> None:
        self._ranges = module_ranges()
        self._ranges.__enter__()
        self.prof = torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        self.prof.__enter__()
        super().start()

    def stop(self) -> None:
        super().stop()
        self.prof.__exit__(None, None, None)
        self._ranges.__exit__(None, None, None)


def profile_contender(name: str, spec: dict, worker) -> dict:
    meter = ProfilingMeter()
    run = worker(name, spec, meter)
    meta = workspace(spec).meta()
    result = categorize(meter.prof, meta["arch"]["vocab"], spec["rank"], meter.wall_s, run["micro_batches"],
                        run["steps"])
    return {"job": name, "train_cpu_s": meter.cpu_s, "train_wall_s": meter.wall_s, "real_tokens": run["real_tokens"],
            "slots": run["slots"], **result}


def profile_fixed(spec: dict) -> dict:
    """bench/train.py's tunekit job (defaults: 21M Llama, 4 x 256 random tokens, LoRA r=8 on q/k/v/o)."""
    from .contenders import _bench_train

    bench = _bench_train()
    job = {"steps": 10, "warmup": 2, "seq_len": 256, "batch": 4, "hidden": 512, "layers": 4, "threads": spec["threads"]}
    torch.set_num_threads(job["threads"])
    meter = ProfilingMeter()

    class Clock:  # bench/train.py's StepClock interface: profile the steps after warm-up
        n = 0

        def begin(self):
            if self.n == job["warmup"]:
                meter.start()

        def end(self):
            self.n += 1
            if self.n == job["warmup"] + job["steps"]:
                meter.stop()

    collate = bench.Collate()

    def ranged_collate(rows):
        with record_function("collate"):
            return collate(rows)
    ranged_collate.tokens = 0
    rows = bench.synthetic_rows(job, job["batch"] * (job["warmup"] + job["steps"]), seed=bench.SEED)
    bench._run_tunekit(job, rows, ranged_collate, Clock(), fused=False)
    result = categorize(meter.prof, bench.VOCAB, bench.RANK, meter.wall_s, job["steps"], job["steps"])
    return {"job": "fixed (bench/train.py tunekit)", "train_cpu_s": meter.cpu_s, "train_wall_s": meter.wall_s,
            "real_tokens": job["steps"] * job["batch"] * job["seq_len"], **result}


def _timed(fn):
    cpu0, wall0 = time.process_time(), time.perf_counter()
    value = fn()
    return value, {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0}


def tokenize_timing(rows_n: int, spec: dict) -> dict:
    """Data preparation of ``rows_n`` rows: tunekit's build_dataset vs a batched datasets.map (same tokenizer)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from tunekit import build_dataset, load_config

    ws = workspace(spec)
    tokenizer = AutoTokenizer.from_pretrained(ws.base_dir)
    rows = generate_rows(rows_n, spec["seed"], 0)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/train.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for packing in (False, True):
            raw = tunekit_config(spec, ws, tmp, packing=packing)
            raw["data"]["train_files"] = [path]
            cfg = load_config(raw)
            _, out[f"tunekit build_dataset row-wise, no cache (packing={packing})"] = _timed(
                lambda: build_dataset(cfg.data, tokenizer, cache=False))
        for procs in (1, 2):
            cache = f"{tmp}/cache-{procs}"
            _, out[f"tunekit build_dataset cache miss, num_proc={procs} (packing=True)"] = _timed(
                lambda: build_dataset(cfg.data, tokenizer, cache=cache, num_proc=procs))  # noqa: B023
        _, out["tunekit build_dataset cache hit (packing=True)"] = _timed(
            lambda: build_dataset(cfg.data, tokenizer, cache=cache))

        def encode_batch(batch):
            examples = [encode(tokenizer, dict(zip(batch, values)), spec["max_seq_len"])
                        for values in zip(*batch.values())]
            return {k: [e[k] for e in examples] for k in ("input_ids", "labels")}
        data = Dataset.from_list(rows)
        for procs in (None, 2):
            _, out[f"datasets.map row-wise encode, num_proc={procs}"] = _timed(
                lambda: data.map(encode_batch, batched=True, num_proc=procs, remove_columns=data.column_names))

        def fast_batch(batch):
            prompts = tokenizer(batch["prompt"])["input_ids"]
            answers = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
            eos = tokenizer.eos_token_id
            return {"input_ids": [p + a + [eos] for p, a in zip(prompts, answers)],
                    "labels": [[-100] * len(p) + a + [eos] for p, a in zip(prompts, answers)]}
        for procs in (None, 2):
            _, out[f"datasets.map batched tokenizer call, num_proc={procs}"] = _timed(
                lambda: data.map(fast_batch, batched=True, num_proc=procs, remove_columns=data.column_names))
    return {"rows": rows_n, "timings": out}


def _print(result: dict) -> None:
    if "timings" in result:
        print(f"data preparation of {result['rows']:,} rows (CPU s of this process; num_proc workers not counted)")
        print("| pipeline | CPU s | wall s |\n|---|---:|---:|")
        for name, t in result["timings"].items():
            print(f"| {name} | {t['cpu_s']:.2f} | {t['wall_s']:.2f} |")
        return
    print(f"profile of {result['job']}: {result['train_cpu_s']:.2f} CPU s ({result['train_wall_s']:.2f} wall, "
          f"profiler on) over {result['steps']} steps ({result['micro_batches']} micro-batches); host syncs per "
          f"micro-batch {result['syncs_per_micro_batch']:.1f} ("
          + ", ".join(f"{k}: {v:.1f}" for k, v in result["syncs_by_category"].items())
          + f"), nonzero per micro-batch {result['nonzero_per_micro_batch']:.1f}")
    print("| where | ms/step | % |\n|---|---:|---:|")
    for row in result["categories"]:
        print(f"| {row['category']} | {row['ms_per_step']:.1f} | {row['pct']:.1f} |")
    print("\ntop ops by self CPU time\n| op | calls | self ms/step |\n|---|---:|---:|")
    for row in result["top_ops"]:
        print(f"| {row['op']} | {row['calls']} | {row['self_ms_per_step']:.1f} |")


def main(args, spec: dict, worker) -> int:
    torch.set_num_threads(spec["threads"])
    if args.tokenize_rows:
        result = tokenize_timing(args.tokenize_rows, spec)
    elif args.profile == "fixed":
        result = profile_fixed(spec)
    else:
        result = profile_contender(args.profile, spec, worker)
    _print(result)
    if args.profile_out:
        with open(args.profile_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
