"""The defaults of each factor method, in one place. Torch-free: the CLI reads them when it starts.

LoRA-SB's eta: measured on SmolLM2-135M (BBC text, rank 16, 32 samples): held-out loss before any
training 3.76 for the base, 3.66 at 1e-4, 3.62 at 3e-4, 4.41 at 1e-3 (the step overshoots).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class XSDefaults:
    init_std: float = 1e-5  # R ~ N(0, init_std^2)


@dataclass(frozen=True)
class SBDefaults:
    samples: int = 64  # examples in the gradient sample
    eta: float = 3e-4  # eta of the approximated first AdamW step (--sb-lr)
    eps: float = 1e-8  # AdamW's default eps
    batch_size: int = 8  # batch size of the gradient pass
    max_length: int = 512  # tokens per example
    max_grad_memory: str = "2GiB"  # gradient accumulators per pass (more: groups)
    grad_mode: str = "eval"  # "train": dropout on during the pass, as the official code
    accum_dtype: str = "float32"  # "bfloat16": the official code's sums on a bf16 model
    step: str = "adam"  # "sign": the official -eta * sign(G)


XS_DEFAULTS = XSDefaults()
SB_DEFAULTS = SBDefaults()
