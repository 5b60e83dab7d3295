"""The config reference (``docs/config.md``), generated from the pydantic models.

    python -m tunekit.config_docs docs/config.md

Every section of ``FinetuneConfig`` (each adapter method, the quantization and
``data.sources`` sub-sections too) becomes a table of key, type, default and the
field's docstring. A test regenerates the file and compares, so the reference
never drifts from the code.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["render_config_reference"]

HEADER = """# Config reference

Generated from tunekit's pydantic models by `python -m tunekit.config_docs docs/config.md`
(a test checks that this file is current). A run config is YAML with these sections; any key can be
overridden on the command line as `section.key=value` (`train.lr=1e-4`). Unknown keys, wrong types and
impossible combinations are refused before anything loads.
"""


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type(a) for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    try:
        text = json.dumps(value if not isinstance(value, Path) else str(value))
    except TypeError:
        text = str(value)
    return f"`{text}`"


def _doc(field) -> str:
    text = " ".join((field.description or "").split())
    return text.replace("|", "\\|")


def _table(cls: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        rows.append(f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | {_doc(field)} |")
    return rows


def render_config_reference() -> str:
    """The whole reference as Markdown."""
    from tunekit.adapters import METHODS
    from tunekit.config import FinetuneConfig
    from tunekit.data.config import DataSource
    from tunekit.models.config import QuantizationConfig

    lines = [HEADER]
    for section, field in FinetuneConfig.model_fields.items():
        lines += [f"## `{section}`", "", " ".join((field.description or "").split()), ""]
        if section == "adapter":
            for method, spec in METHODS.items():
                doc = " ".join((spec.config_cls.__doc__ or "").split("\n\n")[0].split())
                lines += [f"### `adapter.method: {method}`", "", doc, "", *_table(spec.config_cls, "adapter."), ""]
            continue
        cls = field.annotation
        lines += [*_table(cls, f"{section}."), ""]
        if section == "model":
            lines += ["### `model.quantization`", "", *_table(QuantizationConfig, "model.quantization."), ""]
        if section == "data":
            lines += ["### `data.sources[]`", "", "Each entry of `data.sources`; a field left unset takes the "
                      "value of the `data:` section.", "", *_table(DataSource, "data.sources[]."), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render_config_reference()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
