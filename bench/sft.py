"""Long-tailed instruction SFT: tunekit against PEFT + transformers.Trainer and TRL's SFTTrainer.

    python bench/sft.py [--size 20m|100m] [--rows 64] [--eval-rows 32] [--batch 8] [--packed-batch 1]
                        [--repeats 3] [--threads 1] [--contenders a,b,...] [--json out.json] [--markdown out.md]
    python bench/sft.py --quick                     # tiny model, a few rows, one repeat: a smoke test
    python bench/sft.py --profile tunekit:packing   # torch.profiler of one contender (or "fixed": bench/train.py's job)
    python bench/sft.py --tokenize-rows 20000       # data preparation time of tunekit vs datasets.map

The job (``bench/sftbench/workload.py``): a seeded synthetic instruction dataset with
Alpaca/ShareGPT-like lengths (median ~120 tokens, a tail to ~1k), a byte-level BPE
trained on it with ``tokenizers``, one Llama built from a config (~20M or ~100M
parameters), LoRA r=16 on every projection. The contenders
(``bench/sftbench/contenders.py``) each run in a fresh process, one at a time, in
interleaved order (A..Z, then Z..A, ...), ``--repeats`` times; a contender process
builds its model and data, trains one epoch (the timed window: CPU and wall seconds,
peak RSS and RSS added by training), saves its adapter, and scores it with the one
shared evaluation (``measure.heldout_loss``). Per contender the report gives real
(non-pad) tokens per train CPU second (the machine is shared: CPU seconds are what a
contender used, wall seconds include what others took), ratios vs each peer, token
slots and padding, steps, memory, held-out loss and MFU (model FLOPs, formula in
``bench/sftbench/measure.py``, over a matmul rate measured in this session before and
after the contenders). It checks that every contender trained on the same examples.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

# `python bench/sft.py` puts bench/ on sys.path, where bench/kernels.py would be found as a
# top-level `kernels` package by transformers' find_spec("kernels") probe.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def _package():
    """``bench/sftbench`` imported by path as ``sftbench`` (bench/ stays off sys.path)."""
    if "sftbench" not in sys.modules:
        folder = os.path.join(_HERE, "sftbench")
        spec = importlib.util.spec_from_file_location("sftbench", os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules["sftbench"] = module
        spec.loader.exec_module(module)
    return {name: importlib.import_module(f"sftbench.{name}") for name in ("workload", "measure", "contenders",
                                                                             "report")}


_P = _package()
workload, measure, contenders, report = (_P[k] for k in ("workload", "measure", "contenders", "report"))

QUICK = {"size": "tiny", "rows": 12, "eval_rows": 6, "tokenizer_rows": 300, "vocab": 1024, "batch": 4,
         "packed_batch": 1, "repeats": 1}


def worker(name: str, spec: dict, meter: measure.TrainMeter | None = None) -> dict:
    """Run contender ``name`` once in this process; its measurements, work counts and held-out loss."""
    import torch

    torch.set_num_threads(spec["threads"])
    ws = workload.workspace(spec)
    recorder, meter = measure.BatchRecorder(), meter or measure.TrainMeter()
    with tempfile.TemporaryDirectory() as out:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        job = contenders.CONTENDERS[name](spec, ws, out, recorder, meter)
        prep_cpu, prep_wall = time.process_time() - cpu0, time.perf_counter() - wall0
        steps = job.train()
        adapter = os.path.join(out, "adapter")
        job.save(adapter)
        eval_loss = measure.heldout_loss(ws.base_dir, ws.eval_examples(), adapter)
    return {"contender": name, "steps": steps, "cpu_s": meter.cpu_s, "wall_s": meter.wall_s,
            "prep_cpu_s": prep_cpu, "prep_wall_s": prep_wall, "peak_rss_mib": meter.peak_rss_mib,
            "train_rss_mib": meter.train_rss_mib, "peak_cuda_mib": meter.peak_cuda_mib,
            "eval_loss": eval_loss, **recorder.summary()}


def run_process(name: str, spec: dict, timeout: float = 3600.0) -> dict:
    """``worker(name)`` in a fresh Python process (its own imports, peak RSS, thread settings)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--spec", json.dumps(spec)]
    with tempfile.TemporaryFile("w+", encoding="utf-8") as err:  # a file: a chatty worker never blocks on a pipe
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout,
                              env=contenders.worker_env(spec["threads"]))
        results = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not results:
            err.seek(0)
            raise RuntimeError(f"contender {name!r} failed (exit {proc.returncode}):\n{err.read()[-4000:]}")
    return json.loads(results[-1])


def run_all(names: list[str], spec: dict, repeats: int, runner=run_process, log=print) -> list[dict]:
    """Every contender ``repeats`` times with ``runner(name, spec)``, one at a time, forward then reverse order."""
    runs = []
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            run = runner(name, spec)
            log(f"  repeat {rep + 1}/{repeats} {name}: train {run['cpu_s']:.1f} CPU s ({run['wall_s']:.1f} wall), "
                f"{run['steps']} steps, eval loss {run['eval_loss']:.4f}")
            runs.append(run)
    return runs


def benchmark(spec: dict, names: list[str], repeats: int, command: str, runner=run_process) -> dict:
    """Build the workspace, measure the matmul rate, run the contenders; the whole report as a dict.

    ``runner(name, spec) -> run`` runs one contender: a fresh process by default (tests pass ``worker``).
    """
    import torch

    torch.set_num_threads(spec["threads"])
    ws = workload.workspace(spec)
    meta = ws.meta()
    if meta["train_lengths"]["max"] > spec["max_seq_len"] or meta["eval_lengths"]["max"] > spec["max_seq_len"]:
        raise SystemExit(f"bench/sft.py: examples up to {meta['train_lengths']['max']} tokens do not fit "
                         f"--max-seq-len {spec['max_seq_len']}: raise it (contenders truncate differently)")
    seconds = 0.05 if spec["size"] == "tiny" else 0.3
    before = measure.matmul_rate(meta["arch"], min_seconds=seconds)
    runs = run_all(names, spec, repeats, runner)
    after = measure.matmul_rate(meta["arch"], min_seconds=seconds)
    matmul = max(before, after, key=lambda m: m["flops_per_cpu_s"])
    summary = report.summarize(runs, meta["arch"], spec["rank"], matmul)
    context = {"command": command, "env": report.environment(spec["threads"]), "spec": spec, "meta": meta,
               "matmul": matmul, "matmul_runs": [before, after],
               "base_eval_loss": measure.heldout_loss(ws.base_dir, ws.eval_examples())}
    work = report.same_work(runs)
    return {**context, "summary": summary, "same_work": work, "runs": runs,
            "markdown": report.markdown(summary, work, context)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="20m", choices=sorted(workload.SIZES), help="model row (parameters)")
    p.add_argument("--rows", type=int, default=64, help="training examples (one epoch)")
    p.add_argument("--eval-rows", type=int, default=32, help="held-out examples")
    p.add_argument("--batch", type=int, default=8, help="examples per step (unpacked contenders)")
    p.add_argument("--packed-batch", type=int, default=1, help="packed rows per step (packed contenders)")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every contender")
    p.add_argument("--repeats", type=int, default=3, help="runs per contender, interleaved")
    p.add_argument("--contenders", help=f"comma-separated subset of: {', '.join(contenders.CONTENDERS)}")
    p.add_argument("--quick", action="store_true", help="tiny model and data, one repeat (smoke test)")
    p.add_argument("--workdir", default="runs/bench-sft", help="cache of generated data, tokenizer, base model")
    p.add_argument("--json", help="write the whole report (runs included) to this file")
    p.add_argument("--markdown", help="write the Markdown report to this file")
    p.add_argument("--profile", help="profile one contender (or 'fixed') instead of benchmarking")
    p.add_argument("--profile-out", help="write the profile JSON here")
    p.add_argument("--tokenize-rows", type=int, help="time data preparation of this many rows instead")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**{k: v for k, v in QUICK.items() if k not in ("tokenizer_rows", "vocab")})
        args = p.parse_args(argv)
    small = [k for k in ("rows", "eval_rows", "batch", "packed_batch", "max_seq_len", "rank", "threads", "repeats")
             if getattr(args, k) < 1]
    if small:
        p.error(f"{', '.join('--' + k.replace('_', '-') for k in small)} must be >= 1")
    names = args.contenders.split(",") if args.contenders else list(contenders.DEFAULT_CONTENDERS)
    unknown = [n for n in names if n not in contenders.CONTENDERS]
    if unknown:
        p.error(f"unknown contenders {unknown}; choose from {', '.join(contenders.CONTENDERS)}")
    args.names = names
    return args


def make_spec(args: argparse.Namespace) -> dict:
    spec = {k: getattr(args, k) for k in ("size", "rows", "eval_rows", "batch", "packed_batch", "max_seq_len",
                                          "lr", "rank", "threads", "workdir")}
    quick = args.quick or args.size == "tiny"
    spec.update(seed=0, tokenizer_rows=QUICK["tokenizer_rows"] if quick else 4000,
                vocab=QUICK["vocab"] if quick else 8192)
    return spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, json.loads(args.spec))), flush=True)
        return 0
    spec = make_spec(args)
    if args.profile or args.tokenize_rows:
        from sftbench import profile  # noqa: PLC0415  (torch.profiler machinery only when asked)

        return profile.main(args, spec, worker)
    command = "python bench/sft.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"bench/sft.py: {len(args.names)} contenders x {args.repeats} repeats, {args.threads} thread(s)", flush=True)
    result = benchmark(spec, args.names, args.repeats, command)
    print("\n" + result["markdown"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in result.items() if k != "markdown"}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(result["markdown"] + "\n")
    return 0 if result["same_work"]["same_examples"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
