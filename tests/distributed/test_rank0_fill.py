"""The pieces of ``distributed.fill_from_rank0`` that run in one process: the meta-device build of
``load_model`` against transformers' own ``from_pretrained``, and the signature check that reconciles them.
(Two processes filling a meta rank from rank 0: ``test_strategies.py``; ``tunekit finetune --nproc 2``
with it: ``tests/e2e/test_finetune_multiprocess.py``.)"""

from __future__ import annotations

import pytest
import torch
from _tiny_runs import save_tiny

from tunekit.distributed.rank0_fill import check_signatures, signatures
from tunekit.models import ModelConfig, load_model
from tunekit.models.config import QuantizationConfig

CASES = [("llama", "causal_lm", "fp32", None), ("llama", "causal_lm", "bf16", None), ("llama", "causal_lm", "auto", None),
         ("bert", "seq_cls", "fp32", ["a", "b", "c", "d"]), ("t5", "seq2seq", "fp32", None),
         ("t5", "seq2seq", "bf16", None)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny(kind, root / kind) for kind in ("llama", "bert", "t5")}


@pytest.mark.parametrize("kind,task,dtype,labels", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_the_meta_build_has_from_pretrained_names_shapes_and_dtypes_and_reads_no_weights(folders, kind, task, dtype,
                                                                                      labels):
    cfg = ModelConfig(name_or_path=str(folders[kind]), dtype=dtype)
    loaded, _ = load_model(cfg, task=task, label_names=labels)
    meta, _ = load_model(cfg, task=task, label_names=labels, on_meta=True)
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    assert signatures(meta) == signatures(loaded)
    assert meta.training == loaded.training and meta.config._attn_implementation == loaded.config._attn_implementation


def test_signature_check_takes_rank_0s_dtypes_and_refuses_another_model(folders):
    cfg = ModelConfig(name_or_path=str(folders["llama"]))
    meta, _ = load_model(cfg, task="causal_lm", on_meta=True)
    reference = signatures(meta)
    reference["lm_head.weight"] = (reference["lm_head.weight"][0], "bfloat16")  # rank 0 kept another dtype
    check_signatures(meta, reference)
    assert meta.lm_head.weight.dtype == torch.bfloat16 and signatures(meta) == reference
    with pytest.raises(ValueError, match="lacks 'extra.weight'.*fill_from_rank0: false"):
        check_signatures(meta, {**reference, "extra.weight": ((2,), "float32")})
    reference["lm_head.weight"] = ((3, 3), "bfloat16")
    with pytest.raises(ValueError, match="'lm_head.weight' has shape .* on rank 0"):
        check_signatures(meta, reference)


def test_a_quantized_base_is_not_built_on_the_meta_device(folders):
    cfg = ModelConfig(name_or_path=str(folders["llama"]), quantization=QuantizationConfig(bits=4))
    with pytest.raises(ValueError, match="model.quantization: a quantized base cannot be built on the meta device"):
        load_model(cfg, task="causal_lm", on_meta=True)
