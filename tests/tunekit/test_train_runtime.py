"""``retained_cpu_memory``: freed CPU memory stays in the process during training, measured by the
kernel's own count of page faults (``getrusage``), not by reading back what tunekit set.

The allocator's state is process-wide and keeps the history of earlier tests, so the fault counts
are taken in a fresh interpreter."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from tunekit.train.runtime import AFTER_MMAP_THRESHOLD, retained_cpu_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
BLOCK = 2 * AFTER_MMAP_THRESHOLD  # over every mmap threshold glibc picks by itself: its own mmap each time
PAGES = BLOCK // 4096
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_SCRIPT = f"""
import json, resource, torch
from tunekit.train.runtime import retained_cpu_memory

def faults():  # minor page faults of allocating, writing and freeing one block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty({BLOCK // 4}, dtype=torch.float32).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with retained_cpu_memory(torch.device("cpu"), enabled=False) as off:
    untuned = [faults() for _ in range(4)]
with retained_cpu_memory(torch.device("cpu")) as on:
    warm = [faults() for _ in range(8)]  # the heap grows to its steady state (an aligned block may not refit its hole)
    during = [faults() for _ in range(3)]
print(json.dumps({{"off": off, "on": on, "untuned": untuned, "during": during, "after": faults()}}))
"""


@pytest.mark.skipif(not GLIBC, reason="the allocator thresholds are glibc's")
def test_a_freed_block_is_reused_without_faults_during_training_and_handed_back_after():
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, check=True,
                         encoding="utf-8")
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert (seen["off"], seen["on"]) == (False, True)
    assert min(seen["untuned"]) > PAGES // 2, seen  # glibc's own behaviour: faulted in on every allocation
    assert sum(seen["during"]) < PAGES // 20, seen
    assert seen["after"] > PAGES // 2, seen  # malloc_trim gave the retained pages back


@pytest.mark.parametrize("device, enabled, env", [("meta", True, {}), ("cpu", False, {}),
                                                  ("cpu", True, {"MALLOC_TRIM_THRESHOLD_": "131072"})])
def test_nothing_is_raised_off_cpu_when_disabled_or_when_the_environment_tunes_malloc(monkeypatch, device, enabled,
                                                                                     env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with retained_cpu_memory(torch.device(device), enabled) as raised:
        assert raised is False
