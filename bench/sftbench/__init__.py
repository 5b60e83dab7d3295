"""The parts of ``bench/sft.py``: the workload, the contenders, the measurements, the report, the profile.

Loaded by ``bench/sft.py`` from this folder by path (``bench/`` itself must not be on
``sys.path``: ``bench/kernels.py`` would shadow the ``kernels`` package transformers probes for).
"""

__all__ = ["contenders", "measure", "profile", "report", "workload"]
