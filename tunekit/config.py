"""The run configuration: one typed tree, read from YAML, overridden from the CLI.

    model:        ModelConfig        what to load (tunekit.models)
    adapter:      <method>Config     which adapter, picked by ``method`` from tunekit.adapters.METHODS
    data:         DataConfig         tunekit.data
    train:        TrainConfig        tunekit.train
    distributed:  DistributedConfig
    hub:          HubConfig
    output:       OutputConfig

Dotted ``key=value`` overrides are parsed as YAML scalars and merged into the
raw tree *before* validation, so the file and the command line share one
validator. Validation errors become one line each, naming the key, the value
and what is allowed (``ConfigError.lines``); nothing heavy runs before that.

Example:
    >>> cfg = load_config({"model": {"name_or_path": "gpt2"},
    ...                    "data": {"train_files": ["train.jsonl"], "format": "text"}},
    ...                   ["adapter.rank=4", "train.lr=1e-4"])
    >>> cfg.adapter.method, cfg.adapter.rank, cfg.train.lr
    ('lora', 4, 0.0001)
"""

from __future__ import annotations

import difflib
import logging
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunekit.adapters import METHODS, LoRAConfig
from tunekit.data import DataConfig
from tunekit.models.config import ModelConfig
from tunekit.train import TrainConfig

__all__ = [
    "ConfigError",
    "DistributedConfig",
    "FinetuneConfig",
    "HubConfig",
    "OutputConfig",
    "apply_overrides",
    "config_to_yaml",
    "distributed_options",
    "load_config",
    "task_for",
]

_SECTION = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class DistributedConfig(BaseModel):
    """How the model is spread over processes (one process: ``strategy: none``).

    The processes come from ``tunekit finetune --nproc N``, ``tunekit.launch(..., nproc=N)`` or an
    external launcher (torchrun, accelerate launch, deepspeed, srun); every rank reads its own shard
    of each step's global batch of ``train.batch_size x train.grad_accum_steps x processes`` rows.
    """

    model_config = _SECTION

    strategy: Literal["none", "ddp", "fsdp", "deepspeed", "tp", "fsdp_tp", "auto"] = "none"
    """none (one process), ddp (replicas), fsdp (FSDP2 ZeRO-3 sharding), deepspeed (DeepSpeed ZeRO-3),
    tp (tensor parallelism: each layer and its adapters split over tp_size processes), fsdp_tp
    (the 2-D mesh: tensor parallelism inside a node, FSDP2 over the data-parallel processes), or auto:
    the cheapest the memory planner finds to fit the job's devices (it also sets cpu_offload and
    reshard_after_forward; the run logs its choice and resolved_config.yaml records it)."""

    cpu_offload: bool = False
    """fsdp / deepspeed: keep sharded parameters, gradients and optimizer state in host memory between uses."""

    reshard_after_forward: bool = True
    """fsdp: free each layer's gathered weights after forward (ZeRO-3); false keeps them to backward (ZeRO-2-like)."""

    dp_replicate: int = Field(1, ge=1)
    """fsdp / fsdp_tp: replicas of the sharded model (HSDP); each replica is sharded over processes / dp_replicate."""

    timeout_s: float = Field(300.0, gt=0)
    """Seconds a collective may wait before the job fails (a hanging rank); torch's own default is 30 minutes."""

    deepspeed_config: Path | None = None
    """deepspeed: a DeepSpeed JSON file used instead of the generated one (``--print-config`` shows that one)."""

    tp_size: int = Field(1, ge=1)
    """tp / fsdp_tp: processes that split each layer (a divisor of the heads, KV heads and MLP width, inside one
    node); the processes / tp_size groups are data parallel."""

    sequence_parallel: bool = False
    """tp / fsdp_tp: norms and dropout run on sequence shards between the layers (activations / tp_size there)."""

    fill_from_rank0: bool = True
    """strategy fsdp on several processes: only rank 0 loads the base; the other ranks build it on the meta device and
    receive their shards from rank 0 when it is sharded, so the job holds one copy of the base in host memory,
    not one per rank (a quantized base is loaded by every rank). false: every rank loads the base."""

    @model_validator(mode="after")
    def _check_values(self) -> DistributedConfig:
        tensor_parallel = self.strategy in ("tp", "fsdp_tp")
        if tensor_parallel and self.tp_size < 2:
            raise ValueError(f"distributed.strategy={self.strategy} needs distributed.tp_size of 2 or more "
                             f"(got {self.tp_size})")
        if not tensor_parallel and (self.tp_size != 1 or self.sequence_parallel):
            raise ValueError(f"distributed.tp_size / sequence_parallel are for strategy tp or fsdp_tp, not "
                             f"{self.strategy!r}; set distributed.strategy: tp (or fsdp_tp)")
        if self.strategy == "auto" and (problem := _auto_conflict(self)):
            raise ValueError(problem)
        if self.dp_replicate > 1 and self.strategy not in ("fsdp", "fsdp_tp"):
            raise ValueError(f"distributed.dp_replicate={self.dp_replicate} is for strategy fsdp or fsdp_tp (HSDP); "
                             f"set it to 1 for strategy {self.strategy!r}")
        return self


def _auto_conflict(section: DistributedConfig) -> str | None:
    """Why a field set beside ``strategy: auto`` contradicts it (auto decides those fields), or None."""
    decided = {"cpu_offload": False, "reshard_after_forward": True, "dp_replicate": 1, "deepspeed_config": None}
    for name, default in decided.items():
        if getattr(section, name) != default:
            return (f"distributed.{name}={getattr(section, name)} cannot go with distributed.strategy=auto (auto "
                    f"decides the strategy and its options); remove it, or name the strategy it is for")
    return None


class HubConfig(BaseModel):
    """Pushing the result to the Hugging Face Hub."""

    model_config = _SECTION

    push: bool = False
    """Upload the adapter (and merged model, if saved) at the end of the run."""

    repo_id: str | None = None
    """Target repository, ``user/name``; required when push is true."""

    private: bool = True
    """Create the repository as private."""

    base_model: str | None = None
    """Hub id of the base model, when model.name_or_path is a local copy of it (the pushed files name it)."""


class OutputConfig(BaseModel):
    """Where results go."""

    model_config = _SECTION

    dir: Path = Path("runs/default")
    """Run folder: adapter/, merged/, checkpoints/, metrics.jsonl, resolved_config.yaml."""

    save_merged: bool = False
    """Also write the base model with the adapter merged in (plain transformers format) to dir/merged."""

    eval_before: bool = True
    """Evaluate once before training, so the summary shows the metrics before and after."""


def _adapter_union() -> Any:
    # A discriminated union over every registered method, so `adapter.method`
    # picks the class and its errors mention only that class's keys.
    classes = tuple(method.config_cls for method in METHODS.values())
    return Annotated[Union[classes], Field(discriminator="method")]  # noqa: UP007




def task_for(cfg: FinetuneConfig) -> str:
    """The model head a run needs: ``model.task``, or what ``data.format`` implies."""
    if cfg.model.task != "auto":
        return cfg.model.task
    return cfg.data.task


class FinetuneConfig(BaseModel):
    """Everything one fine-tuning run needs."""

    model_config = _SECTION

    model: ModelConfig
    """The base model (and tokenizer) to adapt."""

    adapter: _adapter_union() = LoRAConfig()  # type: ignore[valid-type]
    """The adapter; ``method`` picks the kind (lora, prefix, prompt, bottleneck, ...; default lora)."""

    data: DataConfig
    """The training (and evaluation) data."""

    train: TrainConfig = TrainConfig()
    """The training loop."""

    distributed: DistributedConfig = DistributedConfig()
    """Multi-process strategy."""

    hub: HubConfig = HubConfig()
    """Hub upload."""

    output: OutputConfig = OutputConfig()
    """Output folder and what is written there."""

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data: Any) -> Any:
        # `adapter: {rank: 16}` means LoRA, the default adapter.
        if isinstance(data, dict) and isinstance(data.get("adapter"), dict) and "method" not in data["adapter"]:
            data = {**data, "adapter": {"method": "lora", **data["adapter"]}}
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> FinetuneConfig:
        implied = self.data.task
        if self.model.task not in ("auto", implied):
            raise ValueError(f"model.task={self.model.task!r} does not fit data.format={self.data.format!r} "
                             f"(which trains {implied!r}); set model.task: auto")
        if self.output.save_merged and self.model.quantization is not None:
            raise ValueError("output.save_merged=true cannot merge into a quantized model.quantization base; "
                             "save the adapter and run `tunekit merge` on the unquantized base")
        if task_for(self) == "seq_cls" and not self.adapter.modules_to_save:
            raise ValueError("adapter.modules_to_save=[] leaves the new classification head frozen at random; "
                             "add it, e.g. ['classifier'] (BERT) or ['score'] (Llama)")
        if self.data.packing and self.adapter.method in ("prefix", "prompt"):
            raise ValueError(f"data.packing=true cannot be used with adapter.method={self.adapter.method!r}: its "
                             "virtual tokens would let packed examples attend to each other; set data.packing: false")
        if self.hub.push and not self.hub.repo_id:
            raise ValueError("hub.push=true needs hub.repo_id (e.g. 'user/my-adapter')")
        if problem := distributed_problem(self):
            raise ValueError(problem)
        return self


def distributed_options(cfg: FinetuneConfig):
    """The ``tunekit.distributed.DistributedOptions`` of a run (its ``distributed:`` and ``train:`` sections)."""
    from tunekit.distributed.options import DistributedOptions

    return DistributedOptions.from_configs(cfg.distributed, cfg.train)


def distributed_problem(cfg: FinetuneConfig) -> str | None:
    """Why the run's method, base and training settings cannot run under its strategy (one line), or None."""
    from tunekit.distributed.checks import config_problem

    if cfg.distributed.strategy == "auto":  # each candidate is checked when auto resolves (tunekit.estimate.auto)
        return None
    quantization = cfg.model.quantization
    return config_problem(distributed_options(cfg), cfg.adapter.method,
                          None if quantization is None else f"{quantization.bits}bit",
                          fused_cross_entropy=cfg.train.fused_cross_entropy)


class ConfigError(ValueError):
    """A config that cannot run; ``lines`` holds one self-contained message per problem."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("; ".join(lines))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a YAML file, with one-line errors for a missing or malformed file."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError([f"config file {str(file)!r} is a folder; pass a YAML file, e.g. cookbook/quickstart.yaml"])
    if not file.is_file():
        raise ConfigError([f"config file {str(file)!r} not found (pass a YAML file, e.g. cookbook/quickstart.yaml)"])
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"config file {str(file)!r} is not UTF-8 text (byte {err.start}: "
                           f"{err.object[err.start:err.start + 1]!r}); save it as UTF-8"]) from None
    except OSError as err:
        raise ConfigError([f"config file {str(file)!r} cannot be read ({err.strerror or err})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{file}{where}: not valid YAML ({getattr(err, 'problem', None) or err})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{file}: the top level must be a mapping of sections (model:, data:, ...)"])
    return raw


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``dotted.key=value`` set (value parsed as YAML)."""
    tree = yaml.safe_load(yaml.safe_dump(dict(raw)))  # deep copy of plain data
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError([f"override {item!r} is not key=value (e.g. train.lr=1e-4)"])
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError([f"override {key}: {text!r} is not a valid YAML value"]) from None
        *parents, leaf = key.split(".")
        node = tree
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError([f"override {key}: {where} is a value ({node!r}), not a section"])
        node[leaf] = value
    return tree


def load_config(source: str | Path | Mapping[str, Any] | FinetuneConfig,
                overrides: Iterable[str] = ()) -> FinetuneConfig:
    """Validate a config from a YAML path, a mapping, or a ``FinetuneConfig`` (plus overrides).

    Raises:
        ConfigError: the file is missing or malformed, or the tree is invalid.
    """
    if isinstance(source, FinetuneConfig):
        # Unset fields stay unset (defaults that depend on the model, e.g. data.max_seq_len, are adjusted later).
        raw = source.model_dump(mode="json", exclude_unset=True)
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        raw = read_yaml(source)
    overrides = list(overrides)
    tree = _switch_method(raw, apply_overrides(raw, overrides), overrides)
    try:
        return FinetuneConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err, tree)) from None


def _switch_method(raw: Mapping[str, Any], tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """An override that changes ``adapter.method`` drops the file's fields the new method does not have
    (a note names them), instead of refusing them: ``adapter.method=prefix`` on a LoRA config just works."""
    file_adapter = raw.get("adapter") if isinstance(raw.get("adapter"), dict) else None
    adapter = tree.get("adapter")
    if file_adapter is None or not isinstance(adapter, dict):
        return tree
    old, new = file_adapter.get("method", "lora"), adapter.get("method", "lora")
    if old == new or new not in METHODS:
        return tree
    fields = METHODS[new].config_cls.model_fields
    given = {item.partition("=")[0].removeprefix("adapter.") for item in overrides if item.startswith("adapter.")}
    dropped = sorted(k for k in adapter if k not in fields and k not in given)
    if dropped:
        logging.getLogger("tunekit.config").warning(
            "adapter.method=%s (override) replaces the file's %s adapter: dropped %s",
            new, old, ", ".join(f"adapter.{k}" for k in dropped))
    return {**tree, "adapter": {k: v for k, v in adapter.items() if k not in dropped}}


def config_to_yaml(cfg: FinetuneConfig) -> str:
    """The resolved config as YAML (it loads back to an equal config)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------- error formatting

def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [cls for arg in typing.get_args(annotation) for cls in _model_classes(arg)]


def _section_at(path: tuple, tree: Any) -> type[BaseModel] | None:
    """The config class of the section at ``path`` (adapters resolved by their ``method``)."""
    cls: type[BaseModel] | None = FinetuneConfig
    node = tree
    for part in path:
        field = cls.model_fields.get(part) if cls else None
        node = node.get(part) if isinstance(node, dict) else None
        if field is None:
            return None
        classes = _model_classes(field.annotation)
        method = node.get("method") if isinstance(node, dict) else None
        tagged = [c for c in classes if c.model_fields.get("method") and c.model_fields["method"].default == method]
        cls = (tagged or classes or [None])[0]
    return cls


_TYPE_LABELS = {"str", "int", "float", "bool", "none", "list", "dict", "constrained-str", "is-instance"}


def _clean_loc(loc: tuple) -> tuple:
    # pydantic puts union members ("list[str]", "lora", "function-after[...]") into
    # locations; keep only the keys a user writes.
    out: list = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in _TYPE_LABELS or (out == ["adapter"] and part in METHODS)):
            continue
        out.append(part)
    return tuple(out)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(err: dict, tree: dict) -> str:
    loc = _clean_loc(err["loc"])
    key = ".".join(str(p) for p in loc) or "config"
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        section = _section_at(loc[:-1], tree)
        allowed = sorted(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?)" if close else ""
        where = ".".join(map(str, loc[:-1])) or "the top level"
        return f"unknown key {key}{hint}; {where} accepts: {', '.join(allowed)}"
    if kind == "missing":
        section = _section_at(loc[:-1], tree)
        field = section.model_fields.get(str(loc[-1])) if section else None
        about = f" ({field.description.splitlines()[0]})" if field and field.description else ""
        return f"{key} is required{about}"
    if kind == "union_tag_invalid":
        return f"{key}.method = {err['ctx']['tag']!r} is not an adapter method; choose one of {err['ctx']['expected_tags']}"
    if kind == "union_tag_not_found":
        return f"{key}.method is required; choose one of {', '.join(repr(m) for m in METHODS)}"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        section = _section_at(loc[:-1], tree) if loc else None
        if section is not None and str(loc[-1]) in section.model_fields and key not in msg:
            return f"{key} = {_show(value)}: {msg}"  # a field validator's message, about this field
        return msg
    return f"{key} = {_show(value)}: {msg}"


def format_errors(error: ValidationError, tree: dict) -> list[str]:
    """One line per offending key (alternatives of a union joined with 'or')."""
    grouped: dict[tuple, list[dict]] = {}
    for err in error.errors(include_url=False):
        grouped.setdefault(_clean_loc(err["loc"]), []).append(err)
    lines = []
    for errs in grouped.values():
        if len(errs) == 1 or errs[0]["type"] in ("extra_forbidden", "missing", "value_error"):
            lines.append(_one_line(errs[0], tree))
        else:
            first = _one_line(errs[0], tree)
            others = [e["msg"].removeprefix("Input should be ") for e in errs[1:]]
            lines.append(" or ".join([first, *dict.fromkeys(others)]))
    return lines
