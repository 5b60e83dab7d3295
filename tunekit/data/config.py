"""``DataConfig``: where the data comes from and how rows become training examples.

Embedded as the ``data:`` section of tunekit's config tree. One pydantic model:
typed fields, attribute docstrings as help text, unknown keys rejected, and a
few short cross-field checks whose messages name the key to fix.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)

Format = Literal["text", "instruction", "chat", "classification", "seq2seq"]
FileFormat = Literal["json", "jsonl", "csv", "parquet", "txt"]
Role = Literal["system", "user", "assistant"]

# Fields one entry of data.sources may set (each is its own source, format and field mapping); the
# others (lengths, masking, packing, the chat template, labels) are the run's.
SOURCE_FIELDS = ("dataset", "dataset_config", "split", "eval_split", "train_files", "eval_files", "file_format",
                 "streaming", "max_rows", "format", "text_field", "text_pair_field", "prompt_field", "input_field",
                 "response_field", "prompt_template", "prompt_template_no_input", "messages_field", "chat_format",
                 "role_key", "content_key", "roles", "system", "system_field", "label_field", "source_field",
                 "target_field")


class DataConfig(BaseModel):
    """The ``data:`` section: source, format, field names, lengths, packing."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    # --- source -------------------------------------------------------------------------------
    dataset: str | None = None
    """A dataset for ``datasets.load_dataset``: a Hub name (``tatsu-lab/alpaca``) or a local
    dataset folder. Exclusive with ``train_files``."""

    dataset_config: str | None = None
    """The dataset's configuration (subset) name, e.g. ``wikitext-2-raw-v1``."""

    split: str = "train"
    """Split of ``dataset`` to train on (slices such as ``train[:1000]`` work)."""

    eval_split: str | None = None
    """Split of ``dataset`` to evaluate on (e.g. ``validation``)."""

    train_files: list[str] | None = None
    """Local training files (json, jsonl, csv, parquet, txt). Exclusive with ``dataset``."""

    eval_files: list[str] | None = None
    """Local evaluation files, same formats as ``train_files``."""

    file_format: FileFormat | None = None
    """Format of the local files; by default taken from each file's extension."""

    eval_fraction: float | None = None
    """Hold out this fraction of the training rows for evaluation (a seeded random split)."""

    eval_seed: int | None = None
    """Seed of the ``eval_fraction`` split; ``None`` uses the run seed."""

    streaming: bool = False
    """Stream ``dataset`` instead of downloading it whole; reads the first ``max_rows`` rows.
    Local files are always read row by row."""

    max_rows: int | None = None
    """Read at most this many rows from each source (train, eval)."""

    # --- format and fields ----------------------------------------------------------------------
    format: Format = "text"
    """How a row becomes an example: ``text`` (causal LM on the whole text), ``instruction``
    (alpaca-style prompt/response), ``chat`` (messages through a chat template),
    ``classification`` (text -> label id), ``seq2seq`` (source -> target, T5-style)."""

    text_field: str = "text"
    """Field with the text (``text`` and ``classification`` formats)."""

    text_pair_field: str | None = None
    """Optional second text of a pair (``classification``; e.g. NLI hypothesis)."""

    prompt_field: str = "instruction"
    """Field with the instruction (``instruction`` format)."""

    input_field: str | None = "input"
    """Optional field with extra context for the instruction; empty or missing uses
    ``prompt_template_no_input``."""

    response_field: str = "output"
    """Field with the response the model learns (``instruction`` format)."""

    prompt_template: str = ALPACA_TEMPLATE
    """Prompt text with ``{prompt}`` and ``{input}`` placeholders; the response follows it."""

    prompt_template_no_input: str = ALPACA_TEMPLATE_NO_INPUT
    """Prompt text with a ``{prompt}`` placeholder, used when the input is empty."""

    messages_field: str | None = None
    """Field with the conversation (``chat`` format); ``None``: ``messages`` (OpenAI) or
    ``conversations`` (ShareGPT), as ``chat_format`` says."""

    chat_format: Literal["auto", "openai", "sharegpt"] = "auto"
    """Shape of a conversation: ``openai`` (``messages`` of ``role``/``content``), ``sharegpt``
    (``conversations`` of ``from``/``value``, roles human/gpt/system), or ``auto`` (either, per row)."""

    role_key: str | None = None
    """Key of a message's role when it is neither ``role`` nor ``from`` (LLaMA-Factory's ``role_tag``,
    axolotl's ``message_property_mappings.role``)."""

    content_key: str | None = None
    """Key of a message's text when it is neither ``content`` nor ``value`` (LLaMA-Factory's
    ``content_tag``, axolotl's ``message_property_mappings.content``)."""

    roles: dict[str, Role] = {}
    """Role names of the data mapped to system / user / assistant, e.g. ``{human: user, bot: assistant}``
    (LLaMA-Factory's ``user_tag``/``assistant_tag``); human, gpt, user, assistant, system are known."""

    system: str | None = None
    """System prompt: the first message of every conversation that has none (``chat``), or the text
    before every instruction prompt (``instruction``; a ``{system}`` placeholder in
    ``prompt_template`` puts it there instead)."""

    system_field: str | None = None
    """Field with a per-row system prompt (LLaMA-Factory's ``system`` column); rows without one use
    ``system``."""

    chat_template: str | None = None
    """The chat template: a name (alpaca, chatml, gemma, llama3, mistral, phi3, qwen2, qwen2.5, qwen3,
    vicuna), ``tokenizer`` or ``None`` (the tokenizer's own), a ``.jinja`` file, or Jinja text. With
    ``format: instruction`` it renders each row as a user message (instruction, a newline, the input)
    and the response as the reply, as LLaMA-Factory does; it is saved with the adapter's tokenizer."""

    train_turns: Literal["all", "last"] = "all"
    """Chat loss on every assistant reply (``all``) or on the last one only (``last``; LLaMA-Factory's
    ``mask_history``). Needs ``mask_prompt``."""

    label_field: str | None = None
    """Field with the class label (``classification`` format; required there)."""

    labels: list[str] | None = None
    """The label set, in label-id order. ``None`` infers it from the training rows, sorted
    (numerically when every label is an integer)."""

    source_field: str = "source"
    """Field with the input text (``seq2seq`` format)."""

    target_field: str = "target"
    """Field with the target text (``seq2seq`` format)."""

    # --- lengths and batching -------------------------------------------------------------------
    max_seq_len: int = 1024
    """Maximum tokens per example (and per packed row)."""

    max_target_len: int | None = None
    """Maximum target tokens (``seq2seq``); ``None`` uses ``max_seq_len``."""

    truncation: Literal["truncate", "drop"] = "truncate"
    """Longer examples are cut to ``max_seq_len`` (``truncate``, keeps the start) or skipped
    (``drop``, counted as bad rows). Both are counted in the data statistics."""

    add_eos: bool = True
    """Append the tokenizer's EOS token to ``text`` and ``instruction`` examples (so the model
    learns to stop)."""

    mask_prompt: bool = True
    """Compute the loss only on responses / assistant turns (prompt labels set to -100)."""

    packing: bool | None = None
    """Pack several training examples into each row of up to ``max_seq_len`` tokens; position ids
    restart per example and attention never crosses examples (causal-LM formats only; evaluation
    rows are never packed). ``train.batch_size`` then counts packed rows. null (default):
    ``tunekit finetune`` packs causal-LM data unless the adapter is prefix or prompt tuning or the
    model cannot keep packed examples apart (checked on the loaded model); ``false`` opts out.
    ``build_dataset`` on its own reads null as false."""

    group_by_length: bool = False
    """Order training rows so that each batch holds rows of similar length (less padding)."""

    length_group_size: int = 256
    """Rows per length-sorted group when ``group_by_length``: larger groups pad less but
    shuffle less."""

    # --- several sources ------------------------------------------------------------------------
    sources: list[DataSource] | None = None
    """Several training sources in one run, each with its own ``dataset`` / ``train_files``, ``format``
    and field mapping (unset fields are the ones above). Exclusive with ``dataset`` / ``train_files``."""

    mix: Literal["concat", "interleave"] = "concat"
    """How ``sources`` combine: ``concat`` (every row of each) or ``interleave`` (rows drawn from the
    sources with ``weight`` probabilities, seeded: ``datasets.interleave_datasets``)."""

    mix_stopping: Literal["first_exhausted", "all_exhausted"] = "first_exhausted"
    """``interleave`` stops when the first source runs out (``first_exhausted``: undersampling) or when
    every source has been seen whole (``all_exhausted``: the others repeat, oversampling)."""

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, value):
        # YAML reads `labels: [0, 1]` as ints; labels are compared as strings everywhere.
        return None if value is None else [str(v) for v in value]

    @field_validator("max_seq_len", "length_group_size", "max_rows", "max_target_len")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be >= 1")
        return value

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.sources is not None:
            return self._check_sources()
        if (self.dataset is None) == (self.train_files is None):
            raise ValueError("set exactly one of data.dataset (a Hub name) or data.train_files (local files)")
        if self.eval_files is not None and self.train_files is None:
            raise ValueError("data.eval_files needs data.train_files (use data.eval_split with data.dataset)")
        if self.eval_split is not None and self.dataset is None:
            raise ValueError("data.eval_split needs data.dataset (use data.eval_files with local files)")
        if self.eval_fraction is not None:
            if not 0.0 < self.eval_fraction < 1.0:
                raise ValueError("data.eval_fraction must be in (0, 1)")
            if self.eval_files is not None or self.eval_split is not None:
                raise ValueError("data.eval_fraction conflicts with data.eval_files / data.eval_split: set one")
        if self.streaming and self.max_rows is None:
            raise ValueError("data.streaming needs data.max_rows (how many streamed rows to train on)")
        return self

    def _check_sources(self) -> DataConfig:
        if self.dataset is not None or self.train_files is not None:
            raise ValueError("data.sources replaces data.dataset / data.train_files: move them into the entries")
        if self.eval_files is not None or self.eval_split is not None:
            raise ValueError("with data.sources, give each entry its eval_files / eval_split (or set data.eval_fraction)")
        if not self.sources:
            raise ValueError("data.sources is empty; list at least one source")
        tasks = {self.for_source(i).task for i in range(len(self.sources))}
        if len(tasks) > 1:
            raise ValueError(f"data.sources mix formats of different tasks ({', '.join(sorted(tasks))}); a run "
                             "trains one head: use text / instruction / chat sources together")
        weights = [s.weight for s in self.sources]
        if self.mix == "interleave" and any(w is not None for w in weights) and None in weights:
            raise ValueError("data.mix=interleave: give every data.sources entry a weight, or none (equal weights)")
        return self

    def for_source(self, index: int) -> DataConfig:
        """The data config of ``sources[index]``: its fields over this config's (a single-source config)."""
        entry = self.sources[index]
        own = {k: v for k, v in entry.model_dump().items() if v is not None and k != "weight"}
        base = self.model_dump(exclude={"sources", "dataset", "train_files"})
        try:
            return DataConfig.model_validate({**base, **own})
        except ValueError as err:
            raise ValueError(f"data.sources[{index}]: {_first_error(err)}") from None

    @property
    def task(self) -> Literal["causal_lm", "seq_cls", "seq2seq"]:
        """The model task this format trains: ``causal_lm``, ``seq_cls`` or ``seq2seq`` (that of the
        sources, which share one)."""
        if self.sources:
            return self.for_source(0).task
        return {"classification": "seq_cls", "seq2seq": "seq2seq"}.get(self.format, "causal_lm")

    @model_validator(mode="after")
    def _check_format(self) -> DataConfig:
        if self.format == "classification" and self.label_field is None:
            raise ValueError("data.format 'classification' needs data.label_field (the column with the label)")
        if self.packing and self.task != "causal_lm":
            raise ValueError(f"data.packing works with causal-LM formats (text, instruction, chat), "
                             f"not data.format {self.format!r}: set data.packing to false")
        if "{prompt}" not in self.prompt_template or "{input}" not in self.prompt_template:
            raise ValueError("data.prompt_template needs both {prompt} and {input} placeholders")
        if "{prompt}" not in self.prompt_template_no_input:
            raise ValueError("data.prompt_template_no_input needs a {prompt} placeholder")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("data.labels has duplicates")
        if self.train_turns == "last" and not self.mask_prompt:
            raise ValueError("data.train_turns=last needs data.mask_prompt=true (the loss on the last reply only)")
        return self


def _first_error(err: ValueError) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return (f"{where}: " if where else "") + first["msg"].removeprefix("Value error, ")
    return str(err)


def _source_model() -> type[BaseModel]:
    """``DataSource``: the ``SOURCE_FIELDS`` of ``DataConfig``, each optional (unset = the run's), and a weight."""
    fields: dict[str, Any] = {}
    for name in SOURCE_FIELDS:
        info = DataConfig.model_fields[name]
        fields[name] = (info.annotation | None, Field(None, description=f"{info.description} (unset: the run's)"))
    fields["weight"] = (float | None, Field(None, gt=0, description="Probability weight of this source under "
                                                                     "``mix: interleave`` (normalised over the sources)."))
    return create_model("DataSource", __config__=ConfigDict(extra="forbid"), __doc__="One entry of data.sources.",
                        **fields)


DataSource = _source_model()
DataConfig.model_rebuild()
