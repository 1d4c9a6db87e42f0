"""LoRA-XS: B = U_r, A = S_r V_r^T from the truncated SVD of each target weight W (factors.py);
R starts random (N(0, init_std^2)) and the scaling is alpha / r."""

from __future__ import annotations

from ..factors import compute_xs_factors
from ..method_defaults import XS_DEFAULTS
from ..models import backbone, load_model
from .base import Compute, Method


class XSMethod(Method):
    name = "xs"
    title = "LoRA-XS"
    card_tag = "lora-xs"
    adapter_tags = ("lora-xs",)
    factor_of = "W"
    defaults = XS_DEFAULTS

    def prepare(
        self, request, settings=None, *, all_reduce=None, shard=(0, 1)
    ) -> tuple[object, Compute | None]:
        """The request as it is, and no compute step of its own: ensure_factors' default runs XS.compute."""
        if settings is not None:
            raise TypeError("LoRA-XS takes no method settings: its factors come from the weights alone")
        return request, None

    def compute(self, plan, on_module=None) -> tuple[dict, dict]:
        model = load_model(plan.base.resolved, head="base", dtype=plan.base.weights_dtype)
        result = compute_xs_factors(
            backbone(model),
            plan.targets,
            plan.request.rank,
            plan.request.svd,
            device=plan.request.device,
            on_module=on_module,
        )
        return result.tensors, {"stats": result.stats}


XS = XSMethod()
