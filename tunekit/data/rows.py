"""``TokenizedRows``: a compact, sized sequence of tokenized rows.

Python lists of ints cost ~36 bytes a token; a fine-tuning set of 10M tokens with
three columns would take >1 GB that way. Rows are stored instead as one flat
``array('i')`` per column plus row offsets (4 bytes a token), and indexing builds
the row's dict of python lists on demand::

    data["input_ids"]    = [ids of row 0 | ids of row 1 | ...]
    offsets["input_ids"] = [0, len0, len0 + len1, ...]
    rows[i]              = {"input_ids": data[off[i]:off[i + 1]].tolist(), ...,
                            "attention_mask": [1] * length}
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence

import numpy as np


class TokenizedRows(Sequence):
    """Rows of token-id columns (ragged) and scalar columns (e.g. a class label).

    ``rows[i]`` is a dict of python lists (ints for scalar columns), always with an
    all-ones ``attention_mask`` as long as ``input_ids``.

    Args:
        ragged: names of the list-valued columns; ``input_ids`` must be one of them.
        scalar: names of the int-valued columns.
    """

    def __init__(self, ragged: tuple[str, ...], scalar: tuple[str, ...] = ()):
        if "input_ids" not in ragged:
            raise ValueError("TokenizedRows needs an 'input_ids' column")
        self._data = {name: array("i") for name in ragged}
        self._offsets = {name: array("q", [0]) for name in ragged}
        self._scalar = {name: array("q") for name in scalar}

    @classmethod
    def from_arrays(cls, ragged: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    scalar: Mapping[str, np.ndarray] | None = None) -> TokenizedRows:
        """Rows from flat arrays: ``ragged[name] = (values, offsets)`` with ``offsets[0] == 0`` and one
        more offset than rows; ``scalar[name]`` one value per row (the inverse of ``arrays``)."""
        rows = cls(tuple(ragged), tuple(scalar or ()))
        for name, (values, offsets) in ragged.items():
            rows._data[name] = array("i", np.ascontiguousarray(values, dtype=np.int32).tobytes())
            rows._offsets[name] = array("q", np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
        for name, values in (scalar or {}).items():
            rows._scalar[name] = array("q", np.ascontiguousarray(values, dtype=np.int64).tobytes())
        counts = {len(o) - 1 for o in rows._offsets.values()} | {len(v) for v in rows._scalar.values()}
        if len(counts) != 1:
            raise ValueError(f"TokenizedRows.from_arrays: the columns hold different numbers of rows {sorted(counts)}")
        return rows

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, offsets) of a ragged column as numpy views (no copy), as ``from_arrays`` takes them."""
        return (np.frombuffer(self._data[name], dtype=np.int32) if len(self._data[name]) else np.zeros(0, np.int32),
                np.frombuffer(self._offsets[name], dtype=np.int64))

    def append(self, **columns) -> None:
        """Add a row: one keyword per column (lists for ragged columns, ints for scalar ones)."""
        if columns.keys() != self._data.keys() | self._scalar.keys():
            raise ValueError(f"row columns {sorted(columns)} != {sorted(self._data.keys() | self._scalar.keys())}")
        for name, data in self._data.items():
            data.extend(columns[name])
            self._offsets[name].append(len(data))
        for name, values in self._scalar.items():
            values.append(columns[name])

    def __len__(self) -> int:
        return len(self._offsets["input_ids"]) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self))[index]  # bounds check and negative indices
        row = {name: data[self._offsets[name][i]: self._offsets[name][i + 1]].tolist()
               for name, data in self._data.items()}
        row.update({name: values[i] for name, values in self._scalar.items()})
        row["attention_mask"] = [1] * len(row["input_ids"])
        return row

    def lengths(self) -> list[int]:
        """``len(input_ids)`` of every row, without building the rows."""
        offsets = self._offsets["input_ids"]
        return [offsets[i + 1] - offsets[i] for i in range(len(self))]

    @property
    def columns(self) -> list[str]:
        """The stored column names (``attention_mask`` is derived, not stored)."""
        return [*self._data, *self._scalar]
