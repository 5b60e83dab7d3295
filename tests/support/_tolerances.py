"""The only place tolerances are defined."""

import torch

# Same math, same fp32 weights, different code path (merge vs unmerged, PEFT vs tunekit).
FP32_EXACT = 1e-5
# Merging then unmerging in fp32 (rounding of W + dW - dW).
FP32_MERGE_ROUNDTRIP = 1e-5

# Kernel tests: err(kernel, ref32) <= 2 * err(ref_in_dtype, ref32) + FLOOR[dtype]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()

# A 4-bit base dequantized to fp32 and merged vs the unmerged 4-bit forward.
FP32_DEQUANT_MERGE = 1e-4
# bitsandbytes' CPU 4-bit path computes in bf16 after its repack.
BF16_COMPUTE = 5e-3

# flash_attention's fp32 log-sum-exp vs the fp32 oracle's, by input dtype (inputs rounded to fp16
# shift the scores by ~1e-3 relative).
FLASH_LSE = {torch.float32: 1e-5, torch.float16: 1e-3}
# bitsandbytes' 8-bit forward (inputs cast to fp16, int8 matmul) vs a dequantized fp32 weight.
INT8_COMPUTE = 2e-2
# Merged vs unmerged logits of a bf16 tiny model (2 layers, every linear LoRA-wrapped): the merged
# weight is rounded once to bf16 (2^-9 relative); measured up to 5.4e-3 on logits of magnitude ~0.4.
BF16_MERGE = 1e-2
# A tiny Llama's loss and adapter gradients, fused head + CE vs the unfused head, both under bf16
# autocast: the two round the (B, T, V) logits to bf16 in different orders (measured up to 5.9e-3
# over 5 seeds; a bf16 ulp of the ~4-magnitude logits is 1.6e-2).
BF16_AUTOCAST_LOSS = 2e-2

# Several processes vs one on the same global batch (fp32): the same sums in another order.
DIST_LOSS_REL = 1e-5
# Resuming a sharded checkpoint on another number of processes (resharded optimizer state).
DIST_RESUME_OTHER_WORLD = 1e-6
# Tensor parallelism vs one process (fp32): the same math with each matmul's reduction split over
# the TP ranks; per-step losses (relative) and gradients, adapters (absolute). Measured <= 4e-7.
TP_EXACT = 1e-6
