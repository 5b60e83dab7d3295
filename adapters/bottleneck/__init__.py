"""Bottleneck adapters: serial (Houlsby 2019 / Pfeiffer 2021) and parallel (He et al., 2022)."""

from tunekit.adapters.bottleneck.config import BottleneckConfig
from tunekit.adapters.bottleneck.layer import (
    BottleneckBranch,
    ParallelBottleneck,
    PostNormParallelBottleneck,
    SerialBottleneck,
)
from tunekit.adapters.bottleneck.method import BottleneckMethod
from tunekit.adapters.registry import register_method

register_method(BottleneckMethod())

__all__ = [
    "BottleneckBranch",
    "BottleneckConfig",
    "BottleneckMethod",
    "ParallelBottleneck",
    "PostNormParallelBottleneck",
    "SerialBottleneck",
]
