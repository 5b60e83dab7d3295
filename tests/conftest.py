"""Shared test set-up. TRITON_INTERPRET must be set before anything imports triton."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Forced, not defaulted: a shell with HF_HUB_OFFLINE=0 must not let the suite reach the network.
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# The data cache (tunekit.data.cache) of this session only: never a user's, never left behind.
_DATA_CACHE = tempfile.mkdtemp(prefix="tunekit-test-data-cache-")
os.environ["TUNEKIT_DATA_CACHE"] = _DATA_CACHE
atexit.register(shutil.rmtree, _DATA_CACHE, True)
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
