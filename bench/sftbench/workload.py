"""The job every contender runs: a long-tailed instruction dataset, its BPE tokenizer, one base Llama.

Data. A seeded synthetic "language": a lexicon of ``LEXICON`` lowercase words with
Zipf-distributed frequencies, and a sparse bigram chain (each word has ``SUCCESSORS``
possible next words, Zipf-weighted), so text is learnable. Each example is an
instruction prompt and a response continuing the chain::

    prompt:     "### Instruction:\\n<words>\\n\\n### Response:\\n"
    completion: "<words>"                       (EOS appended by every contender)

Example lengths follow Alpaca/ShareGPT: total words ~ lognormal(median ``MEDIAN_WORDS``,
sigma ``SIGMA``), clipped to [``MIN_WORDS``, ``MAX_WORDS``], of which 15-50% prompt, so the
tokenized lengths have a median of ~120 tokens and a tail to ~1k. The prompt ends on
"\\n", which the byte-level pre-tokenizer never merges with the next word: tokenizing
prompt and completion apart or together gives the same ids (TRL does the latter), so
every contender sees the same tokens.

Tokenizer. ``tokenizers`` BPE (byte-level, like GPT-2/Llama 3) trained on a fixed
corpus of ``tokenizer_rows`` generated rows, BOS prepended, saved as a transformers
fast-tokenizer folder. Base model. A Llama built from a config (fp32, seeded), saved
once with ``save_pretrained``; every contender loads the same folder.

Everything lands in a workspace folder keyed by the spec (``runs/bench-sft/<key>``),
built once and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEXICON, SUCCESSORS, ZIPF = 9000, 12, 1.0
MEDIAN_WORDS, SIGMA, MIN_WORDS, MAX_WORDS = 112, 0.9, 16, 960
PROMPT_HEAD, PROMPT_TAIL = "### Instruction:\n", "\n\n### Response:\n"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IGNORE_INDEX = -100
# LoRA on every projection of a Llama block.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Model rows: ~20M and ~100M parameters at V=8192 (hidden, layers, heads, kv heads, MLP width).
SIZES = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128},
    "20m": {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 8, "intermediate": 1376},
    "100m": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 12, "intermediate": 2048},
}
# Spec fields that change the workspace (data, tokenizer, base weights).
_WORKSPACE_KEYS = ("size", "rows", "eval_rows", "tokenizer_rows", "vocab", "seed")


def _zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


class Language:
    """The seeded lexicon and bigram chain that all text is drawn from."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 1])
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        lengths = rng.integers(2, 9, size=LEXICON)
        self.words = ["".join(rng.choice(letters, size=n)) for n in lengths]
        self.unigram = np.cumsum(_zipf_weights(LEXICON, ZIPF))
        self.next = rng.choice(LEXICON, size=(LEXICON, SUCCESSORS), p=_zipf_weights(LEXICON, ZIPF))
        self.next_cdf = np.cumsum(_zipf_weights(SUCCESSORS, 1.5))

    def chains(self, starts: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
        """(N, length) word ids: a bigram walk from each start word (vectorised over the N walks)."""
        out = np.empty((len(starts), length), dtype=np.int64)
        out[:, 0] = starts
        picks = np.searchsorted(self.next_cdf, rng.random((len(starts), length)))
        picks = np.minimum(picks, SUCCESSORS - 1)
        for t in range(1, length):
            out[:, t] = self.next[out[:, t - 1], picks[:, t]]
        return out


def generate_rows(n: int, seed: int, stream: int) -> list[dict[str, str]]:
    """``n`` prompt/completion rows; ``stream`` separates train (0), eval (1) and tokenizer (2) rows."""
    lang = Language(seed)
    rng = np.random.default_rng([seed, 2, stream])
    total = np.clip(np.round(rng.lognormal(np.log(MEDIAN_WORDS), SIGMA, size=n)), MIN_WORDS, MAX_WORDS).astype(int)
    prompt = np.maximum(3, np.round(total * rng.uniform(0.15, 0.5, size=n))).astype(int)
    starts = np.searchsorted(lang.unigram, rng.random(n)).clip(max=LEXICON - 1)
    walks = lang.chains(starts, int(total.max()) + 1, rng)
    rows = []
    for i in range(n):
        words = [lang.words[w] for w in walks[i, : total[i]]]
        cut = min(int(prompt[i]), len(words) - 1)
        rows.append({"prompt": PROMPT_HEAD + " ".join(words[:cut]) + PROMPT_TAIL,
                     "completion": " ".join(words[cut:])})
    return rows


def train_tokenizer(rows: list[dict[str, str]], vocab: int):
    """A byte-level BPE trained on ``rows``, as a transformers fast tokenizer (BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((r["prompt"] + r["completion"] for r in rows), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def arch_for(spec: dict, vocab: int) -> dict:
    """The model shape of ``spec['size']`` with the tokenizer's vocabulary (rounded up to 64)."""
    if spec["size"] not in SIZES:
        raise ValueError(f"--size {spec['size']!r}: choose one of {sorted(SIZES)}")
    return {**SIZES[spec["size"]], "vocab": -(-vocab // 64) * 64}


def build_base(arch: dict, seed: int):
    """The seeded fp32 Llama of ``arch`` (untied head, no biases, RoPE)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=arch["vocab"], hidden_size=arch["hidden"], intermediate_size=arch["intermediate"],
        num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
        num_key_value_heads=arch["kv_heads"], max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def encode(tokenizer, row: dict[str, str], max_len: int) -> dict[str, list[int]]:
    """One row -> ids and labels (prompt masked, EOS appended), as tunekit and the PEFT tutorials do."""
    prompt = tokenizer(row["prompt"])["input_ids"]
    response = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, labels = (prompt + response)[:max_len], ([IGNORE_INDEX] * len(prompt) + response)[:max_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


@dataclass(frozen=True)
class Workspace:
    """The files of one job: data, tokenizer + base model (one folder), eval set, model shape."""

    root: Path

    @property
    def base_dir(self) -> str:
        return str(self.root / "base")

    @property
    def train_file(self) -> str:
        return str(self.root / "train.jsonl")

    def meta(self) -> dict:
        return json.loads((self.root / "meta.json").read_text(encoding="utf-8"))

    def rows(self, split: str) -> list[dict[str, str]]:
        with open(self.root / f"{split}.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def eval_examples(self) -> list[dict[str, list[int]]]:
        return json.loads((self.root / "eval_tokenized.json").read_text(encoding="utf-8"))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _length_stats(examples: list[dict]) -> dict:
    lengths = np.array([len(e["input_ids"]) for e in examples])
    return {"median": float(np.median(lengths)), "mean": float(lengths.mean()), "p90": float(np.quantile(lengths, 0.9)),
            "max": int(lengths.max()), "min": int(lengths.min()), "tokens": int(lengths.sum())}


def _build_workspace(spec: dict, folder: Path) -> None:
    train, evaluation = generate_rows(spec["rows"], spec["seed"], 0), generate_rows(spec["eval_rows"], spec["seed"], 1)
    tokenizer = train_tokenizer(generate_rows(spec["tokenizer_rows"], spec["seed"], 2), spec["vocab"])
    arch = arch_for(spec, len(tokenizer))
    model = build_base(arch, spec["seed"])
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "eval.jsonl", evaluation)
    eval_examples = [encode(tokenizer, r, 10**9) for r in evaluation]  # never truncated: see check_lengths
    (folder / "eval_tokenized.json").write_text(json.dumps(eval_examples), encoding="utf-8")
    train_examples = [encode(tokenizer, r, 10**9) for r in train]
    meta = {"arch": arch, "params": sum(p.numel() for p in model.parameters()), "tokenizer_vocab": len(tokenizer),
            "train_lengths": _length_stats(train_examples), "eval_lengths": _length_stats(eval_examples),
            "spec": {k: spec[k] for k in _WORKSPACE_KEYS}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def workspace(spec: dict) -> Workspace:
    """The workspace of ``spec``, built (atomically: concurrent runs may race) if missing."""
    key = hashlib.sha256(json.dumps({k: spec[k] for k in _WORKSPACE_KEYS}, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(spec["workdir"]) / f"{spec['size']}-{key}"
    if not (root / "meta.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".build-"))
        try:
            _build_workspace(spec, tmp)
            if not root.exists():
                os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Workspace(root)
