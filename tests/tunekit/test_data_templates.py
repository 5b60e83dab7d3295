"""Named chat templates: each renders a reference conversation exactly as the model family's own
template does (the expected strings are written out here from the official templates), marks the
replies for the loss, and is picked by name, file, Jinja text or the tokenizer."""

import pytest
from _bpe import bpe_tokenizer
from _tiny import write_rows

from tunekit.data import DataConfig, build_dataset
from tunekit.data.chat import ChatEncoder
from tunekit.data.templates import TEMPLATE_NAMES, named_template, resolve_chat_template

IGN = -100
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "See you."}]
# (full conversation, generation prompt after the first user message), bos "<s>", eos "</s>".
EXPECTED = {
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
               "<|im_start|>assistant\nSee you.<|im_end|>\n",
               "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nSee you.<|eot_id|>",
               "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen2": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
              "<|im_start|>assistant\nSee you.<|im_end|>\n",
              "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    # the last reply (after the last user message) carries Qwen3's empty think block, earlier ones not
    "qwen3": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
              "<|im_start|>assistant\n<think>\n\n</think>\n\nSee you.<|im_end|>\n",
              "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    "mistral": ("<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Bye [/INST]See you.</s>",
                "<s>[INST] Be brief.\n\nHi [/INST]"),
    "gemma": ("<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nSee you.<end_of_turn>\n",
              "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"),
    "phi3": ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
             "<|user|>\nBye<|end|>\n<|assistant|>\nSee you.<|end|>\n</s>",
             "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"),
    "alpaca": ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
               "### Instruction:\nBye\n\n### Response:\nSee you.</s>\n\n",
               "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n"),
    "vicuna": ("Be brief. USER: Hi ASSISTANT: Hello!</s>USER: Bye ASSISTANT: See you.</s>",
               "Be brief. USER: Hi ASSISTANT:"),
}
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


def _render(name, messages, **kw):
    return bpe_tokenizer().apply_chat_template(messages, chat_template=named_template(name), tokenize=False,
                                               **SPECIALS, **kw)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_template_renders_the_official_text(name):
    full, prompt = EXPECTED[name]
    assert _render(name, CONVERSATION) == full
    assert _render(name, CONVERSATION[:2], add_generation_prompt=True) == prompt


def test_default_system_prompts_are_the_families_own():
    user = [{"role": "user", "content": "Hi"}]
    assert _render("qwen2", user).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert _render("qwen2.5", user).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    # Stanford Alpaca's no-input prompt, word for word
    assert _render("alpaca", user, add_generation_prompt=True) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nHi\n\n### Response:\n")
    assert _render("vicuna", user, add_generation_prompt=True) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:")


# What the loss is on: each reply and what closes it (eos "<|eos|>" of the test tokenizer).
LEARNED = {"chatml": "Hello!<|im_end|>See you.<|im_end|>", "qwen2": "Hello!<|im_end|>See you.<|im_end|>",
           "qwen2.5": "Hello!<|im_end|>See you.<|im_end|>",
           "qwen3": "Hello!<|im_end|><think>\n\n</think>\n\nSee you.<|im_end|>",
           "llama3": "Hello!<|eot_id|>See you.<|eot_id|>", "mistral": "Hello!<|eos|>See you.<|eos|>",
           "gemma": "Hello!<end_of_turn>See you.<end_of_turn>", "phi3": "Hello!<|end|>See you.<|end|>",
           "alpaca": "Hello!<|eos|>See you.<|eos|>", "vicuna": " Hello!<|eos|> See you.<|eos|>"}


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_every_named_template_learns_exactly_its_replies(tmp_path, name):
    tok = bpe_tokenizer(bos=False)
    path = write_rows(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    row = build_dataset(DataConfig(train_files=[path], format="chat", chat_template=name), tok).train[0]
    learned = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGN])
    assert learned == LEARNED[name]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(CONVERSATION, chat_template=named_template(name),
                                                                   tokenize=False)


def test_last_turn_only_masks_earlier_replies(tmp_path):
    tok = bpe_tokenizer(bos=False)
    path = write_rows(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    cfg = DataConfig(train_files=[path], format="chat", chat_template="chatml", train_turns="last")
    row = build_dataset(cfg, tok).train[0]
    learned = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGN])
    assert learned == "See you.<|im_end|>"


def test_template_by_name_file_text_or_tokenizer(tmp_path):
    tok = bpe_tokenizer(chat_template="{{ 'own' }}")
    (tmp_path / "t.jinja").write_text("{{ 'file' }}", encoding="utf-8")
    assert resolve_chat_template(None, tok) == resolve_chat_template("tokenizer", tok) == "{{ 'own' }}"
    assert resolve_chat_template(str(tmp_path / "t.jinja"), tok) == "{{ 'file' }}"
    assert resolve_chat_template("{{ 'text' }}", tok) == "{{ 'text' }}"
    assert resolve_chat_template("ChatML", tok) == named_template("chatml")
    with pytest.raises(ValueError, match=r"'chatm' is not a template name \(alpaca, chatml"):
        resolve_chat_template("chatm", tok)


def test_end_of_turn_is_what_closes_a_reply():
    tok = bpe_tokenizer()
    ends = {name: ChatEncoder(DataConfig(train_files=["x"], format="chat", chat_template=name), tok).end_of_turn()
            for name in ("chatml", "llama3", "gemma", "phi3", "mistral")}
    assert ends == {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "phi3": "<|end|>",
                    "mistral": tok.eos_token}
