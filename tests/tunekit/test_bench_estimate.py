"""Smoke test of bench/estimate.py on a tiny Llama: every case runs and lands within the README's bound."""

import importlib.util
import json
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "bench" / "estimate.py"
TINY = ["--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "64", "--vocab", "128",
        "--seq-lens", "16", "24", "--methods", "lora", "prefix"]


def test_bench_runs_every_case_and_prints_the_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_estimate", _PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    assert bench.main([*TINY, "--json", str(out)]) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["method"], r["checkpointing"], r["seq_len"]) for r in rows] == [
        (m, c, t) for m in ("lora", "prefix") for c in (False, True) for t in (16, 24)]
    assert all(abs(r["error"]) <= 0.2 and r["measured"] > r["resident"] for r in rows)
    table = capsys.readouterr().out
    assert table.count("| lora |") == 4 and "worst |error|" in table
