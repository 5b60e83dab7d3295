"""Benchmark tunekit's trainer against PEFT + transformers' Trainer on the same LoRA job.

    python bench/train.py [--steps N] [--warmup N] [--seq-len T] [--batch B] [--hidden H]
                          [--layers L] [--threads N] [--repeats R] [--no-fused] [--json out.json]

The job, identical for every contender: a Llama built from a config (fp32,
seeded weights), LoRA r=8 alpha=16 on q/k/v/o_proj, batch B x T synthetic
tokens (same rows in the same order: sequential sampling), AdamW lr 1e-4 with
transformers' default linear decay and grad-norm clip 1.0, ``warmup + steps``
optimizer steps. Contenders:

- peer:    ``peft.get_peft_model`` + ``transformers.Trainer`` (logging, eval and saving off,
           ``use_cpu`` where there is no GPU, optimizer left at the Trainer's default);
- tunekit: ``tunekit.adapters.inject_adapters`` + ``tunekit.train.Trainer.fit``;
- tunekit+fused_ce: the same with ``train.fused_cross_entropy: true``.

Both libraries draw LoRA's A matrices from their own RNG streams, so after
injection every A is overwritten from one seeded generator keyed by layer and
projection (kaiming-uniform bound 1/sqrt(fan_in), as both use) and B is zero:
the runs start from the same weights and should end close.

Each contender runs in its own fresh subprocess (so peak RSS, ``ru_maxrss``, is
its own), and the parent steps them in turn: it waits until all are built,
then lets each run one optimizer step, A,B,C then C,B,A, ..., while the others
wait idle. A load burst from another program therefore hits every contender
alike. A step's time runs from the step's start to its end: forward, backward,
clip, optimizer and scheduler (tunekit's also includes collating its batch;
transformers' batch is fetched before its step-begin callback). Per run the
median over the steps after warmup; over ``--repeats`` fresh sets of
processes, the median of those. "final loss" is the loss of the trained model
on a held-out batch; "train loss" is the mean training loss over all steps.
"RSS added by steps" is peak RSS minus peak RSS when the first step began
(imports, model and trainer built): the training steps' own memory, without
the import footprint (PEFT + transformers.Trainer + datasets import ~130 MiB
more than tunekit on this stack). Prints a markdown table with tunekit/peer ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

# `python bench/train.py` puts bench/ on sys.path, where bench/kernels.py would be
# found as a top-level `kernels` package by transformers' find_spec("kernels") probe.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA, LR, VOCAB, SEED = 8, 16.0, 1e-4, 8192, 0
CONTENDERS = ("peer", "tunekit", "tunekit+fused_ce")
_LORA_KEY = re.compile(r"layers\.(\d+)\..*?(\w+_proj)\..*(lora_[AB])")


def build_model(spec: dict) -> torch.nn.Module:
    """A seeded fp32 Llama: hidden H, L layers, heads of 64, SwiGLU width ~8/3 H (multiple of 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = spec["hidden"]
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=32 * -(-8 * hidden // 96),
        num_hidden_layers=spec["layers"], num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=max(2048, spec["seq_len"]), pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(cfg)


def synthetic_rows(spec: dict, n: int, seed: int) -> list[dict]:
    """``n`` rows of ``seq_len`` random token ids (no padding; labels = input_ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, spec["seq_len"]), generator=g).tolist()
    return [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in ids]


class Collate:
    """Stacks rows into (B, T) tensors and counts the tokens it hands out."""

    def __init__(self) -> None:
        self.tokens = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """Times optimizer steps. Gated (under the parent): prints ``WAIT`` and waits for a ``go`` line on
    stdin before each step, prints ``STEP <seconds>`` after it; so the parent can start the first step
    once every contender is set up, and interleave them step by step."""

    def __init__(self, gated: bool) -> None:
        self.gated, self.times, self._t0 = gated, [], 0.0
        self.setup_rss_mib: float | None = None  # peak RSS before the first step: imports, model, trainer

    def begin(self) -> None:
        if self.setup_rss_mib is None:
            self.setup_rss_mib = peak_rss_mib()
        if self.gated:
            print("WAIT", flush=True)
        if self.gated and not sys.stdin.readline():
            raise SystemExit("bench/train.py: the parent closed the pipe")
        self._t0 = time.perf_counter()

    def end(self) -> None:
        self.times.append(time.perf_counter() - self._t0)
        if self.gated:
            print(f"STEP {self.times[-1]}", flush=True)


def reset_lora(model: torch.nn.Module) -> int:
    """Overwrite every LoRA A from one seeded generator (by layer, projection) and zero every B.

    Returns:
        The number of LoRA matrices set (2 per wrapped linear).
    """
    params = {}
    for name, p in model.named_parameters():
        match = _LORA_KEY.search(name)
        if match and p.requires_grad:
            params[(int(match[1]), match[2], match[3])] = p
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for key in sorted(params):
            p = params[key]
            if key[2] == "lora_B":
                p.zero_()
            else:  # (r, fan_in): kaiming_uniform_(a=sqrt(5)) has bound 1/sqrt(fan_in)
                bound = p.shape[1] ** -0.5
                p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
    return len(params)


def _run_peer(spec: dict, rows: list[dict], collate: Collate, clock: StepClock) -> tuple[torch.nn.Module, float, float]:
    """PEFT + transformers.Trainer; returns the model, the mean train loss and the held-out loss at init."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = get_peft_model(build_model(spec), LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    reset_lora(model)
    init_loss = heldout_loss(model, spec)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=spec["batch"], learning_rate=LR,
            max_steps=spec["warmup"] + spec["steps"], train_sampling_strategy="sequential",
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=SEED,
            disable_tqdm=True, remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          data_collator=collate, callbacks=[Timer()])
        result = trainer.train()
    return model, result.training_loss, init_loss


class _BenchData:
    """The DataBundle interface over the synthetic rows, in their stored order."""

    task, eval, label_names = "causal_lm", None, None

    def __init__(self, rows: list[dict], collate: Collate) -> None:
        self.train, self.collate = rows, collate

    def train_order(self, epoch: int, seed: int, step_rows: int | None = None) -> list[int]:
        return list(range(len(self.train)))


def _run_tunekit(spec: dict, rows: list[dict], collate: Collate, clock: StepClock, fused: bool):
    """tunekit inject_adapters + Trainer.fit; returns the model, the mean train loss and the held-out loss at init."""
    from tunekit.adapters import LoRAConfig, inject_adapters
    from tunekit.train import Trainer, TrainConfig

    model = build_model(spec)
    inject_adapters(model, LoRAConfig(rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS))
    reset_lora(model)
    init_loss = heldout_loss(model, spec)
    total = spec["warmup"] + spec["steps"]
    cfg = TrainConfig(batch_size=spec["batch"], lr=LR, max_steps=total, log_every=total, seed=SEED,
                      fused_cross_entropy=fused, resume="never")

    class ClockedTrainer(Trainer):
        def train_step(self, window):
            clock.begin()
            metrics = super().train_step(window)
            clock.end()
            return metrics

    with tempfile.TemporaryDirectory() as out:
        result = ClockedTrainer(model, _BenchData(rows, collate), cfg, out).fit()
    return model, result.history[-1]["loss"], init_loss


def heldout_loss(model: torch.nn.Module, spec: dict) -> float:
    """Mean LM loss of ``model`` on one held-out batch (rows no contender trained on)."""
    batch = Collate()(synthetic_rows(spec, spec["batch"], seed=SEED + 1))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    model.eval()
    with torch.no_grad():
        return float(model(**batch, use_cache=False).loss)


def worker(name: str, spec: dict, gated: bool = False) -> dict:
    """Run contender ``name`` once in this process; its timings, losses, tokens and peak memory."""
    torch.set_num_threads(spec["threads"])
    rows = synthetic_rows(spec, spec["batch"] * (spec["warmup"] + spec["steps"]), seed=SEED)
    collate, clock = Collate(), StepClock(gated)
    if name == "peer":
        model, train_loss, init_loss = _run_peer(spec, rows, collate, clock)
    else:
        model, train_loss, init_loss = _run_tunekit(spec, rows, collate, clock, fused=name.endswith("fused_ce"))
    timed = clock.times[spec["warmup"]:]
    return {
        "contender": name, "s_per_step": statistics.median(timed), "steps_timed": len(timed),
        "tokens": collate.tokens, "tokens_per_step": collate.tokens / len(clock.times),
        "train_loss": train_loss, "init_loss": init_loss, "final_loss": heldout_loss(model, spec),
        "peak_rss_mib": peak_rss_mib(), "train_rss_mib": peak_rss_mib() - clock.setup_rss_mib,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def _read_line(proc: subprocess.Popen, err, name: str, prefix: str) -> str:
    """The next stdout line of ``proc`` starting with ``prefix`` (other output is skipped).

    Raises:
        RuntimeError: the worker exited first; carries the tail of its stderr (file ``err``).
    """
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix):]
    proc.wait()
    err.seek(0)
    raise RuntimeError(f"contender {name!r} failed (exit {proc.returncode}):\n{err.read()[-3000:]}")


def run_interleaved(names: tuple[str, ...], spec: dict) -> list[dict]:
    """One fresh process per contender (own peak RSS), stepped in turn: step s runs every contender
    once, in forward order on even s and reverse order on odd s, so load drifts hit all alike."""
    cmd = [sys.executable, os.path.abspath(__file__), "--spec", json.dumps(spec), "--worker"]
    # stderr goes to a file, not a pipe: a chatty worker can then never block on a full pipe.
    errs = {n: tempfile.TemporaryFile("w+") for n in names}
    procs = {n: subprocess.Popen([*cmd, n], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs[n], text=True)
             for n in names}
    try:
        for name in names:  # every contender built and at its first step: nobody is importing any more
            _read_line(procs[name], errs[name], name, "WAIT")
        for step in range(spec["warmup"] + spec["steps"]):
            for name in names if step % 2 == 0 else names[::-1]:
                procs[name].stdin.write("go\n")
                procs[name].stdin.flush()
                _read_line(procs[name], errs[name], name, "STEP ")
        return [json.loads(_read_line(procs[n], errs[n], n, "RESULT ")) for n in names]
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            errs[name].close()


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per contender: medians over repeats of step time and RSS; losses and tokens from the first run
    (the job is deterministic: every repeat trains the same weights on the same rows)."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["contender"] for r in runs):
        mine = [r for r in runs if r["contender"] == name]
        s = statistics.median(r["s_per_step"] for r in mine)
        out[name] = {
            "s_per_step": s, "tokens_per_s": mine[0]["tokens_per_step"] / s,
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
            "train_rss_mib": statistics.median(r["train_rss_mib"] for r in mine),
            "final_loss": mine[0]["final_loss"], "train_loss": mine[0]["train_loss"],
            "init_loss": mine[0]["init_loss"],
            "tokens": mine[0]["tokens"], "repeats": len(mine),
        }
    return out


def print_table(summary: dict[str, dict]) -> None:
    """Markdown table: one row per contender, each metric with its ratio to the peer row."""
    peer = summary["peer"]
    print("| contender | s/step | tokens/s | peak RSS MiB | RSS added by steps MiB | final loss | train loss | tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in summary.items():
        cells = []
        for key, fmt in (("s_per_step", ".3f"), ("tokens_per_s", ",.0f"), ("peak_rss_mib", ",.0f"),
                         ("train_rss_mib", ",.0f"), ("final_loss", ".5f"), ("train_loss", ".5f")):
            ratio = "" if name == "peer" or not peer[key] else f" (x{r[key] / peer[key]:.3f})"
            cells.append(f"{r[key]:{fmt}}{ratio}")
        print(f"| {name} | {' | '.join(cells)} | {r['tokens']:,} |")
    print(f"\nheld-out loss moved {peer['final_loss'] - peer['init_loss']:+.2e} in training (peer)", end="")
    for name, r in summary.items():
        if name != "peer":
            print(f"\n{name} vs peer: |final loss diff| {abs(r['final_loss'] - peer['final_loss']):.2e}, "
                  f"|train loss diff| {abs(r['train_loss'] - peer['train_loss']):.2e}", end="")
    print("\n\n(x...) = tunekit / peer: below 1 is better for s/step and RSS, above 1 for tokens/s.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in every contender")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per contender, alternated")
    p.add_argument("--no-fused", action="store_true", help="skip the tunekit+fused_ce row")
    p.add_argument("--json", help="also write runs and summary to this JSON file")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = {k: v for k, v in vars(args).items() if k in ("steps", "seq_len", "batch", "hidden", "layers", "threads",
                                                          "repeats")}
    bad = [f"--{k.replace('_', '-')}" for k, v in sizes.items() if v < 1] + (["--warmup"] if args.warmup < 0 else [])
    if bad or args.hidden % 64:
        p.error(f"{', '.join(bad) or '--hidden'}: sizes must be >= 1 (--warmup >= 0), --hidden a multiple of 64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, json.loads(args.spec), gated=True)), flush=True)
        return 0
    spec = {k: getattr(args, k) for k in ("steps", "warmup", "seq_len", "batch", "hidden", "layers", "threads")}
    names = CONTENDERS[:2] if args.no_fused else CONTENDERS
    gpu = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if gpu else 'CPU'}, torch {torch.__version__}, "
          f"{args.threads} threads, fp32; Llama H={args.hidden} L={args.layers} V={VOCAB}, LoRA r={RANK} "
          f"on {','.join(TARGETS)}; batch {args.batch}x{args.seq_len}, {args.warmup}+{args.steps} steps, "
          f"{args.repeats} repeats")
    if not gpu:
        print("No GPU: CPU figures only (tunekit's kernels run their PyTorch reference); GPU figures need a GPU.")
    runs = [run for _ in range(args.repeats) for run in run_interleaved(names, spec)]
    summary = summarize(runs)
    print()
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spec": spec, "device": "cuda" if gpu else "cpu", "runs": runs, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
