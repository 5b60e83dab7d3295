"""``data.max_seq_len`` against the model's position limit, checked before any weights load.

Models with learned or fixed position tables (BERT, GPT-2, ...) crash mid-run
with a tensor-size error on a longer sequence; rotary models degrade past the
length they were trained for. The limit is read from the model's config alone
(``config.json`` of a folder or Hub id, or the ``model_type`` defaults and
``config_overrides`` of a ``from_config`` run): the first of the config fields
below that is set. Models without one (T5's relative positions) are not
limited.
"""

from __future__ import annotations

__all__ = ["POSITION_FIELDS", "check_position_limit", "position_limit"]

POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def position_limit(model_cfg) -> tuple[str, int] | None:
    """(config field, value) of the model's position limit, or None when unknown or unlimited."""
    from transformers import AutoConfig

    from tunekit.models import resolve_source

    overrides = dict(model_cfg.config_overrides)
    try:
        if model_cfg.from_config and not model_cfg.name_or_path:
            config = AutoConfig.for_model(model_cfg.model_type)
        else:
            config = AutoConfig.from_pretrained(resolve_source(model_cfg.name_or_path), revision=model_cfg.revision,
                                                trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None  # loading the model reports this properly
    for name in POSITION_FIELDS:
        value = overrides.get(name, getattr(config, name, None))
        if isinstance(value, int) and value > 0:
            return name, value
    return None


def check_position_limit(cfg) -> str | None:
    """Refuse a ``data.max_seq_len`` (or seq2seq ``max_target_len``) set above the model's position limit;
    lower the default ``max_seq_len`` (not set in the config) to the limit. Returns a line saying so, or None.

    Raises:
        ConfigError: one line naming the limit and the value to set.
    """
    from tunekit.config import ConfigError

    found = position_limit(cfg.model)
    if found is None:
        return None
    name, limit = found
    data, note = cfg.data, None
    if data.max_seq_len > limit and "max_seq_len" not in data.model_fields_set:
        data.max_seq_len = limit
        note = f"data.max_seq_len: {limit} (the model's {name}; the default is longer)"
    for key, value in (("max_seq_len", data.max_seq_len), ("max_target_len", data.max_target_len)):
        if value is not None and value > limit:
            raise ConfigError([f"data.{key}={value} is longer than the model's {limit} positions ({name} in its "
                               f"config); set data.{key}: {limit} or less"])
    return note
