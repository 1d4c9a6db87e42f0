"""Quantized bases (`--quantize int8|nf4`): the backbone's linear layers as bitsandbytes 8-bit or 4-bit
layers, which take about a quarter (int8) or an eighth (nf4) of their float32 bytes.

What is quantized: every nn.Linear (and GPT-2 Conv1D, turned into the Linear it computes) of the
backbone, target or not. The output head (lm_head, a classifier) and the embeddings stay as loaded.
The frozen factors A, B never come from here: they are the full-precision base's (the same factor
cache entry as without --quantize: init reads the checkpoint's weights, never a quantized layer), so
an adapter trained on a quantized base merges into the full-precision weights like any other.

bitsandbytes serves both devices: its CPU backend (tested: 0.50.2) and its CUDA kernels. The layers are
quantized on `device` (bitsandbytes quantizes a layer as it moves it there) one at a time, from the
model as loaded on the CPU: besides the quantized layers, the device holds at most one full-precision
layer at a time.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import UsageError
from .linear import is_linear, weight_matrix, weight_shape

__all__ = ["QUANTIZE_KINDS", "is_quantized", "quantize_linears", "require_backend"]

QUANTIZE_KINDS = ("int8", "nf4")
EXTRA = "loraxs[quant]"
# LLM.int8()'s outlier threshold, transformers' default (BitsAndBytesConfig.llm_int8_threshold): input
# columns with a value above it run in 16 bits. On CPU, bitsandbytes trains through its weight-only path
# whatever the threshold (the int8 weight dequantized for each product: as fast as float32 here) and
# evaluates through LLM.int8() proper, where the threshold counts. Measured on SmolLM2-135M (4 held-out
# BBC articles, 64 tokens): loss 4.174 in float32, 4.184 at threshold 6, 4.194 at 0, 4.445 in nf4.
INT8_THRESHOLD = 6.0

# Our own messages replace bitsandbytes' advisory warnings (on a CPU with AVX-512 BF16, at its import,
# that an optional kernel package is missing and it falls back to its own). Set when this module is
# imported (models imports it), not only for --quantize: once installed, bitsandbytes is imported by
# PEFT's own import, which transformers' trainer utilities (train's scheduler) trigger.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def require_backend(kind: str):
    """The bitsandbytes module, or one line naming the extra to install (a usage error, exit 2)."""
    if kind not in QUANTIZE_KINDS:
        raise UsageError(f"unknown --quantize {kind!r}: use {' or '.join(QUANTIZE_KINDS)}")
    try:
        import bitsandbytes  # optional backend (the quant extra): imported only when asked for
    except ImportError:
        raise UsageError(f"--quantize {kind} needs the bitsandbytes package: pip install '{EXTRA}'") from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """A layer whose weight is not a dense floating tensor (an int8 or packed 4-bit one)."""
    weight = getattr(module, "weight", None)
    return weight is not None and not weight.dtype.is_floating_point


def quantize_linears(root: nn.Module, kind: str, *, device: torch.device | str | None = None) -> list[str]:
    """Replace every linear layer under `root` (a model's backbone) by its bitsandbytes counterpart,
    quantized on `device` (default: where the layer is); returns the names replaced, in model order.

    Each computes in its weight's dtype as loaded, recorded as the layer's `compute_dtype` (bitsandbytes'
    Linear4bit has one; the 8-bit layer gets the attribute), which the LoRA-XS layer's A and B take
    (linear.compute_dtype)."""
    bnb = require_backend(kind)
    modules = dict(root.named_modules())
    names = [n for n, module in modules.items() if n and is_linear(module) and not is_quantized(module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, _quantized(bnb, modules[name], kind, device))
    return names


def _quantized(bnb, module: nn.Module, kind: str, device) -> nn.Module:
    m, n = weight_shape(module)
    weight = weight_matrix(module).detach()  # (out, in); a Conv1D's is transposed into a Linear's
    compute = weight.dtype
    target = torch.device(device) if device is not None else weight.device
    bias = module.bias
    with torch.no_grad():
        w = weight.contiguous().cpu()
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(
                n, m, bias=bias is not None, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta"
            )
            layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            layer.compute_dtype = compute  # read by linear.compute_dtype; bitsandbytes does not use it
        else:
            layer = bnb.nn.Linear4bit(
                n, m, bias=bias is not None, compute_dtype=compute, quant_type="nf4", device="meta"
            )
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", module=layer)
            # bitsandbytes 0.50 repacks a 4-bit weight for its AVX-512 CPU kernel at the first no-grad
            # forward in eval mode, and keeps it so: that kernel refuses an out_features that is not a
            # multiple of 32, and a training step after it (an --eval-every evaluation) fails or gets no
            # gradient. The generic 4-bit path serves both (SmolLM2's evaluation: about float32's time).
            layer.support_avx512bf16_for_cpu = False
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(compute).cpu(), requires_grad=False)
    layer.train(module.training)
    layer.requires_grad_(False)
    return layer.to(target)  # bitsandbytes quantizes the weight as it moves it (CPU included)


def quantized_weights_bytes(base, kind: str | None, item: int) -> int:
    """About how many bytes the backbone's weights take (`base`: initialize.BaseInfo, `item`: bytes per
    number as loaded), its linear layers quantized by `kind`: int8, a byte per weight and a float32
    scale per row; nf4, half a byte per weight and about a byte per block of 64 (its absmax, itself
    quantized: bitsandbytes' double quantization)."""
    total = base.total_params * item
    if not kind:
        return total
    shapes = [(info.out_features, info.in_features) for info in base.modules.values()]
    linear = sum(m * n for m, n in shapes)
    rows = sum(m for m, _ in shapes)
    quantized = linear + 4 * rows if kind == "int8" else linear // 2 + linear // 64
    return total - linear * item + quantized
