"""Runs -> per-contender summary (medians over repeats, ratios, MFU) -> JSON and a Markdown table."""

from __future__ import annotations

import os
import platform
import statistics
from importlib import metadata

from .contenders import PEERS
from .measure import train_flops

_SPREAD = ("cpu_s", "wall_s")
_SHORT = {"peft+trainer": "PEFT", "peft+trainer:group_by_length": "PEFT gbl", "trl:packing": "TRL pack",
          "trl:padding_free": "TRL pf"}


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(runs: list[dict], arch: dict, rank: int, matmul: dict) -> dict[str, dict]:
    """Per contender: time spreads, tokens/s, padding, memory, eval loss, FLOPs and MFU, ratios vs each peer.

    The work counts and eval loss come from the first repeat (the job is deterministic; ``same_work``
    checks the repeats agree).
    """
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["contender"] for r in runs):
        mine = [r for r in runs if r["contender"] == name]
        first = mine[0]
        row = {key: _spread([r[key] for r in mine]) for key in _SPREAD}
        flops = train_flops(arch, first["lengths"], first["targets"], rank)
        cpu, wall = row["cpu_s"]["median"], row["wall_s"]["median"]
        row.update({
            "repeats": len(mine), "steps": first["steps"], "micro_batches": first["micro_batches"],
            "sequences": first["sequences"], "real_tokens": first["real_tokens"], "slots": first["slots"],
            "padding_pct": first["padding_pct"], "targets": first["targets"], "examples_sha": first["examples_sha"],
            "tokens_per_cpu_s": first["real_tokens"] / cpu, "tokens_per_wall_s": first["real_tokens"] / wall,
            "prep_cpu_s": statistics.median(r["prep_cpu_s"] for r in mine),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
            "train_rss_mib": statistics.median(r["train_rss_mib"] for r in mine),
            "peak_cuda_mib": first["peak_cuda_mib"], "eval_loss": first["eval_loss"],
            "eval_loss_spread": max(r["eval_loss"] for r in mine) - min(r["eval_loss"] for r in mine),
            "model_flops": flops, "mfu_pct": 100.0 * flops / cpu / matmul["flops_per_cpu_s"],
        })
        out[name] = row
    for row in out.values():
        row["vs"] = {peer: row["tokens_per_cpu_s"] / out[peer]["tokens_per_cpu_s"] for peer in PEERS if peer in out}
    return out


def same_work(runs: list[dict]) -> dict:
    """Whether every run of every contender trained on the same examples (same tokens, same loss masks)."""
    shas = {r["examples_sha"] for r in runs}
    first = runs[0]
    return {"same_examples": len(shas) == 1, "examples_sha": sorted(shas), "sequences": first["sequences"],
            "real_tokens": first["real_tokens"], "targets": first["targets"]}


def environment(threads: int) -> dict:
    """The machine and the library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    names = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers", "tunekit")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "threads": threads,
            "python": platform.python_version(), "versions": versions}


def _ratio(row: dict, peer: str) -> str:
    return f"x{row['vs'][peer]:.2f}" if peer in row["vs"] else "-"


def markdown(summary: dict[str, dict], work: dict, context: dict) -> str:
    """The report: context lines, one table row per contender, the same-work line."""
    env, spec, meta, matmul = context["env"], context["spec"], context["meta"], context["matmul"]
    arch, lengths = meta["arch"], meta["train_lengths"]
    peers = [p for p in PEERS if p in summary]
    lines = [
        f"command: `{context['command']}`",
        f"machine: {env['cpu']}, {env['cores']} cores, {env['gpu'] or 'no GPU'}; torch threads {env['threads']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        f"model: Llama {meta['params'] / 1e6:.1f}M (H={arch['hidden']}, L={arch['layers']}, heads {arch['heads']}, "
        f"MLP {arch['intermediate']}, V={arch['vocab']}), fp32; LoRA r={spec['rank']} alpha={2 * spec['rank']} on "
        f"all 7 projections; lr {spec['lr']} linear, 1 epoch, batch {spec['batch']} examples / "
        f"{spec['packed_batch']} packed row(s) of {spec['max_seq_len']}",
        f"data: {spec['rows']} train rows (tokens per example: median {lengths['median']:.0f}, mean "
        f"{lengths['mean']:.0f}, p90 {lengths['p90']:.0f}, max {lengths['max']}), {spec['eval_rows']} held-out rows; "
        f"matmul rate {matmul['flops_per_cpu_s'] / 1e9:.1f} GFLOP/s per CPU second "
        f"({matmul['flops_per_wall_s'] / 1e9:.1f} per wall second)",
        "",
        "| contender | train CPU s (min/med/max) | wall s | real tok/s | " + " | ".join(f"vs {_SHORT[p]}" for p in peers)
        + " | slots | pad % | steps | peak RSS MiB | +train MiB | eval loss | MFU % | prep CPU s |",
        "|---|---|---:|---:|" + "---:|" * len(peers) + "---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in summary.items():
        cpu = r["cpu_s"]
        cells = [f"{cpu['min']:.1f} / {cpu['median']:.1f} / {cpu['max']:.1f}", f"{r['wall_s']['median']:.1f}",
                 f"{r['tokens_per_cpu_s']:,.0f}", *[_ratio(r, p) for p in peers], f"{r['slots']:,}",
                 f"{r['padding_pct']:.1f}", str(r["steps"]), f"{r['peak_rss_mib']:,.0f}", f"{r['train_rss_mib']:,.0f}",
                 f"{r['eval_loss']:.4f}", f"{r['mfu_pct']:.1f}", f"{r['prep_cpu_s']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    same = "yes" if work["same_examples"] else f"NO ({len(work['examples_sha'])} different sets)"
    lines += ["", f"same examples in every run: {same} ({work['sequences']} sequences, {work['real_tokens']:,} real "
              f"tokens, {work['targets']:,} targets); held-out loss of the base: {context['base_eval_loss']:.4f}",
              "real tok/s = real (non-pad) tokens / median train CPU s; vs X = that ratio over peer X; "
              "MFU = model FLOPs (bench/sftbench/measure.py) per CPU second / the matmul rate."]
    return "\n".join(lines)
