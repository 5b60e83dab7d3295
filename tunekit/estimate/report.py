"""A plan for people and for scripts: a text table, JSON, and a bar chart of the breakdown per layout."""

from __future__ import annotations

import json
from pathlib import Path

from tunekit.estimate.planner import Plan, plan_as_dict
from tunekit.estimate.units import GiB, format_bytes

__all__ = ["format_plan", "plan_json", "plot_plan"]

_COLUMNS = ("frozen", "trainable", "grads", "optim", "activ", "temps", "peak", "host")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}" if n else "-"


def _header(result: Plan) -> list[str]:
    m, d, s = result.model, result.devices, result.settings
    share = f"{m['trainable'] / m['parameters']:.2%}" if m["parameters"] else "0%"
    shape = s.shape
    run = [f"batch {shape.batch} x {shape.seq_len} tokens", f"{shape.mixed_precision} autocast"
           if shape.mixed_precision != "no" else "fp32 compute"]
    run += ["gradient checkpointing"] * shape.grad_checkpointing + ["packed"] * shape.packed
    run += ["fused cross-entropy"] * shape.fused_cross_entropy + [s.optimizer]
    host = f", host {format_bytes(d.host_memory)} per node" if d.host_memory else ""
    return [
        f"model   {m['model_type']} ({m['task']}) from {m['origin'] or 'config'}",
        f"        {m['parameters']:,} parameters, {m['trainable']:,} trainable ({share}, {m['method']}); "
        f"weights {m['dtype']}{' + ' + m['quantized'] if m['quantized'] else ''}",
        f"run     {', '.join(run)}",
        f"GPUs    {d.count} x {format_bytes(d.memory)} ({format_bytes(d.usable)} usable: {d.headroom:.0%} "
        f"headroom){host}",
    ]


def format_plan(result: Plan) -> str:
    """The plan as a table (GiB per GPU, host GiB per node) with the recommendation and advice."""
    width = max(len(r.layout.label) for r in result.rows)
    lines = [*_header(result), ""]
    lines.append(f"{'layout (GiB per GPU)':<{width}}  " + " ".join(f"{c:>9}" for c in _COLUMNS) + "  fits")
    for row in result.rows:
        if not row.supported:
            lines.append(f"{row.layout.label:<{width}}  n/a: {row.note}")
            continue
        values = [row.frozen, row.trainable, row.gradients, row.optimizer, row.activations, row.temporaries,
                  row.peak, row.host]
        mark = "yes" if row.fits else "no"
        lines.append(f"{row.layout.label:<{width}}  " + " ".join(f"{_gib(v):>9}" for v in values) + f"  {mark}")
    lines += ["", f"recommended: {result.reason}" if result.recommended else f"no fit: {result.reason}"]
    if result.recommended is not None:
        config = ", ".join(f"{k}: {v}" for k, v in result.recommended.layout.config().items())
        lines.append(f"             distributed: {{{config}}}")
    lines += [f"  {line}" for line in result.advice]
    notes = sorted({r.note for r in result.rows if r.supported and r.note})
    lines += [""] + [f"note: {n}" for n in notes] if notes else []
    return "\n".join(lines)


def plan_json(result: Plan) -> str:
    """The plan as JSON (every size in bytes)."""
    return json.dumps(plan_as_dict(result), indent=2, default=str)


def plot_plan(result: Plan, path: str | Path) -> Path:
    """A stacked bar per supported layout (GiB per GPU) with the usable-memory line; written to ``path``.

    Raises:
        ValueError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'tunekit[plot]'") from None
    rows = [r for r in result.rows if r.supported]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.8))
    labels = [r.layout.label for r in rows]
    left = [0.0] * len(rows)
    for term in rows[0].terms() if rows else []:
        sizes = [r.terms()[term] / GiB for r in rows]
        ax.barh(labels, sizes, left=left, label=term)
        left = [a + b for a, b in zip(left, sizes)]
    ax.axvline(result.devices.usable / GiB, color="black", linestyle="--", linewidth=1,
               label=f"usable ({result.devices.usable / GiB:.1f} GiB)")
    ax.invert_yaxis()
    ax.set_xlabel("GiB per GPU at the step's peak")
    ax.set_title(f"{result.model['model_type']} {result.model['method']}: memory per GPU by layout")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
