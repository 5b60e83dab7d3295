"""`tunekit finetune` stopped by SIGTERM: exit 130, a checkpoint and no final adapter; the same
command resumes from the checkpoint and finishes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import yaml
from _tiny_runs import run_config

from tunekit.cli import main
from tunekit.train.trainer import READY_MESSAGE


@pytest.mark.slow
def test_sigterm_keeps_a_checkpoint_and_the_same_command_resumes(tmp_path):
    cfg = run_config(tmp_path, "causal_lm", "lora")
    out = tmp_path / "run-causal_lm-lora"
    # Long enough that the signal lands mid-run; the rerun shortens it (the schedule is constant).
    cfg["train"].update(max_steps=100_000, save_every=3, scheduler="constant", eval_every=None)
    cfg["output"]["eval_before"] = False
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")

    proc = subprocess.Popen([sys.executable, "-m", "tunekit", "finetune", str(config)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # signal once the trainer says its handler is installed, however slow the machine
        lines.append(line)
        if line.strip() == READY_MESSAGE:
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-2000:]
    assert "run the same command again to resume" in output
    assert not (out / "adapter").exists()
    stopped_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))

    assert main(["finetune", str(config), f"train.max_steps={stopped_at + 2}"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert steps[-1] == stopped_at + 2 and stopped_at + 1 in steps  # continued, not restarted
