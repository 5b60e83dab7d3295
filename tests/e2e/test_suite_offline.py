"""The suite runs offline on any machine: tests/conftest.py forces the Hugging Face offline switches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.mark.slow  # a fresh interpreter that imports torch (conftest checks for CUDA): ~2 s
def test_conftest_forces_offline_mode_whatever_the_shell_says():
    code = (
        "import os, runpy, sys; runpy.run_path(sys.argv[1]); "
        "import huggingface_hub.constants as hub; "
        f"print([os.environ[k] for k in {SWITCHES!r}], hub.HF_HUB_OFFLINE)"
    )
    env = {**os.environ, **dict.fromkeys(SWITCHES, "0")}
    proc = subprocess.run([sys.executable, "-c", code, str(CONFTEST)], env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['1', '1', '1'] True"
