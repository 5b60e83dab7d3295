"""Byte sizes as people write them (``80GB``, ``24 GiB``, ``512g``) and back.

GPU vendors' "80GB" is 80 GiB of addressable memory as PyTorch counts it, so
``GB`` and ``GiB`` both mean 2**30 bytes here (as ``nvidia-smi`` and
``torch.cuda`` report), and ``TB``/``TiB`` 2**40.

Example:
    >>> parse_bytes("80GB") == 80 * 2**30, parse_bytes("1.5 TiB") == 1.5 * 2**40
    (True, True)
    >>> format_bytes(3 * 2**30 + 2**29)
    '3.50 GiB'
"""

from __future__ import annotations

import re

__all__ = ["GiB", "MiB", "format_bytes", "parse_bytes"]

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str, what: str = "memory") -> int:
    """Bytes in ``text``: a number with an optional K/M/G/T unit (``B``, ``iB`` suffixes optional).

    Raises:
        ValueError: one line naming ``what`` and the accepted forms.
    """
    match = _PATTERN.match(str(text))
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{what} {text!r} is not a size; write a positive number with a unit, e.g. 80GB, 24GiB, "
                         "512G or 81920MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1 (two decimals)."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
