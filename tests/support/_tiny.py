"""Tiny Hugging Face models built from configs (no Hub), and tiny data."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


def tiny_llama(layers: int = 2, kv_heads: int = 2, **kw) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, GQA 4:2); ``kw`` overrides any LlamaConfig field."""
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **kw})).eval()


def tiny_gpt2(layers: int = 2, **kw) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(num_labels: int = 3, **kw) -> BertForSequenceClassification:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels, **kw)
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(**kw) -> T5ForConditionalGeneration:
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **kw)
    return T5ForConditionalGeneration(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "t5": tiny_t5}


def tiny_inputs(kind: str, batch: int = 2, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs for a tiny model of ``kind`` (with a padded row for masks)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, :2] = 0  # left padding on the last row
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


def model_output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# Chat template of tiny_tokenizer(): role markers are special tokens, each turn ends with <|end|>.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The same rendering, with the assistant replies marked by {% generation %} tags (the newline is an
# expression because transformers renders with trim_blocks, which eats a newline after a block tag).
TINY_CHAT_TEMPLATE_TAGGED = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_SPECIALS = ["[pad]", "[bos]", "[eos]", "[unk]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TINY_CHARS = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:;!?'\"-#()")


def tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE):
    """Character-level fast tokenizer (ids < VOCAB, pad 0 / bos 1 / eos 2 as the tiny models).

    One token per character (a BPE with no merges), ``[bos]`` prepended, role markers as
    special tokens; unknown characters map to ``[unk]``.
    """
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*TINY_SPECIALS, *TINY_CHARS])}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[unk]"))
    core.add_special_tokens(TINY_SPECIALS)
    core.post_processor = processors.TemplateProcessing(
        single="[bos] $A", pair="[bos] $A [eos] $B", special_tokens=[("[bos]", 1), ("[eos]", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[pad]", bos_token="[bos]",
                                  eos_token="[eos]", unk_token="[unk]")
    tok.chat_template = chat_template
    return tok


def write_rows(path, rows: list[dict]):
    """Write ``rows`` to ``path`` in the format its extension names (json, jsonl, csv, parquet, txt).

    ``txt`` writes each row's single value as one line. Returns ``str(path)``.
    """
    import csv
    import json
    from pathlib import Path

    path = Path(path)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".txt":
        path.write_text("".join(next(iter(r.values())) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"write_rows: unknown extension {suffix!r}")
    return str(path)


def train_losses(model, batch: dict[str, torch.Tensor], steps: int, lr: float) -> list[float]:
    """Losses of ``steps`` AdamW steps on one fixed ``batch`` (must hold labels), trainable params only."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def greedy_by_full_forwards(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference greedy decode: no cache, one full forward per step, positions as generate() derives them."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids
