"""Multi-process tests: worker functions live in _dist_helpers (importable by the workers)."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
