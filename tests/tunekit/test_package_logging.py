"""Importing tunekit drops one notice of bitsandbytes (an optional Hub kernel it never needs) and nothing else."""

import logging

import tunekit  # noqa: F401  (installs the filter)

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"  # the logger bitsandbytes.backends.cpu.ops creates at import


def test_the_kernels_community_notice_is_dropped_and_other_records_kept(caplog):
    log = logging.getLogger(BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_LOGGER):
        # the text bitsandbytes 0.50 logs (backends/cpu/ops.py) when `kernels` is not installed
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        log.warning("a 4-bit weight could not be read")
    assert [r.getMessage() for r in caplog.records] == ["a 4-bit weight could not be read"]
