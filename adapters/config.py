"""Base class of every adapter method's config.

Configs are pydantic models: typed fields, attribute docstrings as help, and
errors that name the bad key and the allowed values (``extra="forbid"``).
tunekit's config tree embeds them under ``adapter:``; ``method`` is the
discriminator that picks the class.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class AdapterConfig(BaseModel):
    """Fields shared by every adapter method."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    method: str
    """Which adapter method this config describes (the registry name)."""

    modules_to_save: list[str] = []
    """Modules trained in full beside the adapter (e.g. a new classification head:
    ``["classifier"]``, ``["score"]``). Matched as name suffixes, as in PEFT."""
