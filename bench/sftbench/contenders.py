"""The contenders: one function each, the same job through each library's public API.

Every contender loads the same base folder (fp32, SDPA unless it says otherwise), puts
LoRA r=``rank`` alpha=2r, no dropout, on all seven projections, overwrites every LoRA A
from one seeded generator and zeroes every B (``bench/train.py``'s ``reset_lora``: the
libraries draw A from different RNG streams), and trains one epoch over the same
training rows with AdamW at ``lr``, linear decay to 0 without warmup, no weight
decay, grad-norm clip 1.0, fp32, no gradient checkpointing, prompt tokens masked out
of the loss. Unpacked contenders take ``batch`` examples per step; packed ones
``packed_batch`` rows of up to ``max_seq_len`` tokens.

- ``peft+trainer``: ``get_peft_model`` + ``transformers.Trainer``, rows tokenized with
  ``Dataset.map`` (prompt and response apart, as tunekit does), ``DataCollatorForSeq2Seq``
  dynamic padding; ``peft+trainer:group_by_length`` with the Trainer's length-grouped sampler.
- ``trl:packing`` / ``trl:padding_free``: ``trl.SFTTrainer`` on prompt/completion rows
  (completion-only loss, its default for them) with ``packing=True`` (BFD, padding-free
  rows) or ``padding_free=True``; ``bf16`` and ``gradient_checkpointing`` (on by default
  in TRL) switched off, as for everyone.
- ``tunekit:*``: ``tunekit.load_config`` -> ``load_model`` -> ``choose_fast_path`` -> ``build_dataset``
  -> ``inject_adapters`` -> ``Trainer.fit`` -> ``save_adapters``, as ``tunekit.finetune`` does;
  ``tunekit:defaults`` sets nothing but the job (packing and the attention are tunekit's defaults).

The timed window is the training loop only: HF's ``on_train_begin`` to ``on_train_end``,
tunekit's ``fit()``. Model loading and tokenization are timed apart ("prep").
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .measure import BatchRecorder, TrainMeter
from .workload import TARGETS, Workspace, encode

_BENCH = Path(__file__).resolve().parents[1]


def _bench_train():
    """``bench/train.py`` as a module (its ``reset_lora`` gives every library the same LoRA start)."""
    if "bench_train" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_train", _BENCH / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_train"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_train"]


def reset_lora(model: torch.nn.Module) -> int:
    """Every LoRA A from one seeded generator, every B zero; returns the number of matrices set."""
    return _bench_train().reset_lora(model)


@dataclass
class Job:
    """A built contender: ``train()`` runs the timed loop and returns the optimizer steps; ``save(dir)``."""

    train: Callable[[], int]
    save: Callable[[str], None]


def _peft_lora(spec: dict):
    from peft import LoraConfig

    return LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0, target_modules=list(TARGETS),
                      task_type="CAUSAL_LM")


def _hf_model(ws: Workspace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ws.base_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(ws.base_dir)


def _hf_args(spec: dict, out: str, batch: int) -> dict:
    """The TrainingArguments every HF-based contender shares."""
    return dict(
        output_dir=out, per_device_train_batch_size=batch, learning_rate=spec["lr"], num_train_epochs=1,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"],
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, bf16=False, gradient_checkpointing=False,
    )


def _meter_callback(meter: TrainMeter):
    from transformers import TrainerCallback

    class MeterCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.start()

        def on_train_end(self, args, state, control, **kwargs):
            meter.stop()

    return MeterCallback()


def _hf_job(trainer) -> Job:
    def train() -> int:
        trainer.train()
        return trainer.state.global_step
    return Job(train, lambda path: trainer.model.save_pretrained(path))


def peft_trainer(spec: dict, ws: Workspace, out: str, recorder: BatchRecorder, meter: TrainMeter, *,
                 group_by_length: bool = False) -> Job:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer = _hf_model(ws)
    model = get_peft_model(model, _peft_lora(spec))
    reset_lora(model)
    rows = Dataset.from_list(ws.rows("train"))
    data = rows.map(lambda row: encode(tokenizer, row, spec["max_seq_len"]), remove_columns=rows.column_names)
    sampling = "group_by_length" if group_by_length else "random"
    args = TrainingArguments(**_hf_args(spec, out, spec["batch"]), train_sampling_strategy=sampling)
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=recorder.wrap(collate),
                      callbacks=[_meter_callback(meter)])
    return _hf_job(trainer)


def trl_sft(spec: dict, ws: Workspace, out: str, recorder: BatchRecorder, meter: TrainMeter, *,
            packing: bool) -> Job:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _hf_model(ws)
    batch = spec["packed_batch"] if packing else spec["batch"]
    # padding_free without packing refuses max_length (it would not be enforced): the rows are all shorter.
    extra = {"packing": True, "max_length": spec["max_seq_len"]} if packing else {"padding_free": True,
                                                                                   "max_length": None}
    args = SFTConfig(**_hf_args(spec, out, batch), completion_only_loss=True, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(ws.rows("train")),
                         processing_class=tokenizer, peft_config=_peft_lora(spec),
                         callbacks=[_meter_callback(meter)])
    reset_lora(trainer.model)
    trainer.data_collator = recorder.wrap(trainer.data_collator)
    return _hf_job(trainer)


def tunekit_config(spec: dict, ws: Workspace, out: str, *, packing: bool | None = False,
                   group_by_length: bool = False, attn: str | None = "sdpa", fused: bool = False) -> dict:
    """The tunekit config of a contender; ``None`` leaves a setting at tunekit's default."""
    train_batch = spec["packed_batch"] if packing else spec["batch"]
    cfg = {
        "model": {"name_or_path": ws.base_dir, "dtype": "fp32", "attn_implementation": attn},
        "adapter": {"method": "lora", "rank": spec["rank"], "alpha": 2.0 * spec["rank"], "dropout": 0.0,
                    "target_modules": list(TARGETS)},
        "data": {"train_files": [ws.train_file], "format": "instruction", "prompt_field": "prompt",
                 "input_field": None, "response_field": "completion", "prompt_template_no_input": "{prompt}",
                 "max_seq_len": spec["max_seq_len"], "mask_prompt": True, "group_by_length": group_by_length},
        "train": {"batch_size": train_batch, "lr": spec["lr"], "epochs": 1, "scheduler": "linear",
                  "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": spec["seed"],
                  "fused_cross_entropy": fused, "log_every": 10**9, "resume": "never"},
        "output": {"dir": out, "eval_before": False},
    }
    if packing is not None:
        cfg["data"]["packing"] = packing
    if attn is None:
        del cfg["model"]["attn_implementation"]
    return cfg


def tunekit_run(spec: dict, ws: Workspace, out: str, recorder: BatchRecorder, meter: TrainMeter, **options) -> Job:
    from tunekit import Trainer, build_dataset, load_config, load_model
    from tunekit.adapters import inject_adapters, save_adapters
    from tunekit.models.fastpath import choose_fast_path

    cfg = load_config(tunekit_config(spec, ws, out, **options))
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_model(cfg.model, task="causal_lm")
    # What `tunekit finetune` does with the settings left at their defaults (packing where exact).
    fast = choose_fast_path(model, task="causal_lm", method=cfg.adapter.method, packing=cfg.data.packing,
                            attn_implementation=cfg.model.attn_implementation)
    cfg.data.packing = fast.packing
    cfg.train.batch_size = spec["packed_batch"] if fast.packing else spec["batch"]
    data = build_dataset(cfg.data, tokenizer, seed=cfg.train.seed, cache=ws.root / "data-cache")
    inject_adapters(model, cfg.adapter)
    reset_lora(model)
    data.collate = recorder.wrap(data.collate)
    trainer = Trainer(model, data, cfg.train, out)

    def train() -> int:
        meter.start()
        result = trainer.fit()
        meter.stop()
        return result.global_step
    return Job(train, lambda path: save_adapters(model, path))


def _contender(fn, **options):
    return lambda spec, ws, out, recorder, meter: fn(spec, ws, out, recorder, meter, **options)


PEERS = ("peft+trainer", "peft+trainer:group_by_length", "trl:packing", "trl:padding_free")
CONTENDERS = {
    "peft+trainer": _contender(peft_trainer),
    "peft+trainer:group_by_length": _contender(peft_trainer, group_by_length=True),
    "trl:packing": _contender(trl_sft, packing=True),
    "trl:padding_free": _contender(trl_sft, packing=False),
    # tunekit with nothing set but the job: whatever its defaults are (packing and the varlen attention
    # where exact: one packed row a step, as the other packed contenders).
    "tunekit:defaults": _contender(tunekit_run, packing=None, attn=None),
    "tunekit": _contender(tunekit_run),
    "tunekit:group_by_length": _contender(tunekit_run, group_by_length=True),
    "tunekit:packing": _contender(tunekit_run, packing=True),
    "tunekit:packing+tunekit_attn": _contender(tunekit_run, packing=True, attn="tunekit"),
    "tunekit:packing+fused_ce": _contender(tunekit_run, packing=True, fused=True),
}
DEFAULT_CONTENDERS = tuple(CONTENDERS)


def worker_env(threads: int) -> dict[str, str]:
    """Environment of a contender process: offline, quiet, ``threads`` OpenMP/MKL threads."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
