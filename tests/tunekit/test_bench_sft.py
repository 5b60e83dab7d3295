"""bench/sft.py: the FLOP formula, the batch accounting, the interleaving, and a quick run of every contender.

Oracles: ``torch.utils.flop_counter`` counting a real forward + backward (for the MFU numerator),
hand-written packed rows (for the sequence split), and the training rows tokenized here
independently of any contender (for "every contender trained on the same examples").
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "bench" / "sft.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sft", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_formula_matches_torch_flop_counter():
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    bench = _bench()
    arch = {**bench.workload.SIZES["tiny"], "vocab": 96}  # GQA: 4 heads over 2 key/value heads
    model = bench.workload.build_base(arch, seed=0)
    model.set_attn_implementation("eager")  # plain matmuls the counter sees (it skips the CPU SDPA kernel)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=list(bench.workload.TARGETS)))
    ids = torch.randint(3, 96, (1, 12))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    # eager attention scores all L^2 pairs and the head runs on every position: count those here too
    expected = bench.measure.train_flops(arch, [12], head_positions=12, rank=4, causal=False)
    assert counter.get_total_flops() == expected


def test_causal_pairs_count_each_packed_sequence_alone():
    bench = _bench()
    measure, arch = bench.measure, {**bench.workload.SIZES["tiny"], "vocab": 96}
    packed = measure.train_flops(arch, [5, 3], head_positions=0, rank=4)
    alone = measure.train_flops(arch, [5], head_positions=0, rank=4) + measure.train_flops(arch, [3], 0, rank=4)
    assert packed == alone  # attention is per sequence: 15 + 6 causal pairs, not (5 + 3)(5 + 3 + 1)/2
    full = measure.train_flops(arch, [8], head_positions=0, rank=4)
    assert full - packed == 12 * arch["hidden"] * arch["layers"] * (36 - 21)


def test_split_sequences_reads_tunekit_and_trl_packed_rows():
    split = _bench().measure.split_sequences
    ids, labels = [1, 5, 6, 1, 7], [-100, 5, 6, -100, 7]
    expected = [([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7])]
    assert split({"input_ids": ids, "labels": labels, "position_ids": [0, 1, 2, 0, 1]}) == expected
    assert split({"input_ids": ids, "labels": labels, "seq_lengths": [3, 2]}) == expected
    assert split({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}) == [(ids, labels)]


def test_recorder_counts_real_tokens_slots_and_targets():
    recorder = _bench().measure.BatchRecorder()

    def pad(rows):
        width = max(len(r["input_ids"]) for r in rows)
        return {"input_ids": torch.zeros(len(rows), width)}
    collate = recorder.wrap(pad)
    collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [1, 4], "labels": [-100, -100]}])
    summary = recorder.summary()
    assert (summary["real_tokens"], summary["slots"], summary["targets"], summary["sequences"]) == (5, 6, 2, 2)
    assert math.isclose(summary["padding_pct"], 100 / 6)


def test_contenders_run_interleaved_forward_then_reverse():
    bench = _bench()
    seen = []
    runs = bench.run_all(["a", "b", "c"], {}, 3, runner=lambda name, spec: seen.append(name) or {
        "contender": name, "cpu_s": 1.0, "wall_s": 1.0, "steps": 1, "eval_loss": 1.0}, log=lambda _: None)
    assert seen == ["a", "b", "c", "c", "b", "a", "a", "b", "c"] and len(runs) == 9


@pytest.mark.slow
def test_quick_benchmark_every_contender_same_examples_and_report(tmp_path):
    bench = _bench()
    args = bench.parse_args(["--quick", "--workdir", str(tmp_path)])
    spec = bench.make_spec(args)
    result = bench.benchmark(spec, args.names, 1, "test", runner=bench.worker)
    json.dumps({k: v for k, v in result.items() if k != "markdown"})  # the --json payload serialises

    ws = bench.workload.workspace(spec)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(ws.base_dir)
    examples = [bench.workload.encode(tokenizer, row, spec["max_seq_len"]) for row in ws.rows("train")]
    real = sum(len(e["input_ids"]) for e in examples)
    targets = sum(label != -100 for e in examples for label in e["labels"][1:])
    assert result["same_work"] == {"same_examples": True, "examples_sha": result["same_work"]["examples_sha"],
                                   "sequences": spec["rows"], "real_tokens": real, "targets": targets}
    summary = result["summary"]
    assert list(summary) == list(bench.contenders.DEFAULT_CONTENDERS)
    for name, row in summary.items():
        assert row["real_tokens"] == real and row["slots"] >= real, name
        for key in ("tokens_per_cpu_s", "mfu_pct", "peak_rss_mib", "eval_loss"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key)
        assert row["eval_loss"] < result["base_eval_loss"], name  # every contender trained
        assert set(row["vs"]) == set(bench.contenders.PEERS)
    assert summary["peft+trainer"]["vs"]["peft+trainer"] == 1.0
    packed = [n for n in summary if "packing" in n or n == "tunekit:defaults"]
    assert all(summary[n]["padding_pct"] == 0.0 for n in packed)
    # the defaults are packing + the varlen attention (exact: the same training as setting both)
    assert summary["tunekit:defaults"]["eval_loss"] == summary["tunekit:packing+tunekit_attn"]["eval_loss"]
    table = result["markdown"]
    assert all(f"| {name} |" in table for name in summary) and "same examples in every run: yes" in table
