"""LoRA-XS: B = U_r, A = S_r V_r^T from the truncated SVD of each target weight W (factors.py);
R starts random (N(0, init_std^2)) and the scaling is alpha / r."""

from __future__ import annotations

from ..estimate import human_bytes
from ..factors import compute_xs_factors, xs_factors_of
from ..method_defaults import XS_DEFAULTS
from ..models import backbone, load_model
from ..weights import NotStreamable, one_ahead, open_weights, planned_peak_bytes, streamable
from .base import Compute, Method

# The exact SVD's float32 temporaries the size of W: LAPACK's working copy, U and Vh at full rank.
EXACT_WORKSPACE_COPIES = 3


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
        """Each target weight read straight from the checkpoint (weights.py), its SVD on --device while
        the next one is read; a checkpoint that cannot be read so exactly is loaded as a model instead.
        Both give the same bits (tests/test_stream_init.py)."""
        base, request = plan.base, plan.request
        try:
            reader = open_weights(base.resolved, base.config, base.modules, plan.targets, base.weights_dtype)
            result = xs_factors_of(
                one_ahead(reader.matrices(plan.targets)),
                request.rank,
                request.svd,
                device=request.device,
                on_module=on_module,
            )
        except NotStreamable:
            model = load_model(base.resolved, head="base", dtype=base.weights_dtype)
            result = compute_xs_factors(
                backbone(model), plan.targets, request.rank, request.svd, device=request.device,
                on_module=on_module,
            )  # fmt: skip
        return result.tensors, {"stats": result.stats}

    def plan_fields(self, plan, grad_budget: int | None) -> dict:
        """The streamed compute's planned peak (weights.planned_peak_bytes) from the shapes alone."""
        base = plan.base
        streamed = base.resolved.kind == "preset" or streamable(base.resolved)
        load = base.weights_dtype.itemsize
        stored = (base.stored_dtype or base.weights_dtype).itemsize
        shapes = base.shapes(plan.targets).values()
        copies = EXACT_WORKSPACE_COPIES if plan.request.svd.backend == "exact" else 1
        peak = planned_peak_bytes(
            shapes, stored_itemsize=stored, load_itemsize=load, factor_bytes=plan.factor_bytes,
            workspace_copies=copies,
        )  # fmt: skip
        if not streamed:  # a .bin checkpoint is loaded whole
            peak += base.total_params * load
        m, n = max(shapes, key=lambda shape: shape[0] * shape[1])
        return {"planned_peak_bytes": peak, "streamed": streamed, "largest_target": [m, n]}

    def memory_text(self, doc: dict) -> str:
        m, n = doc["largest_target"]
        if doc["streamed"]:
            how = f"one weight at a time from the checkpoint (largest {m} x {n}), the next one read ahead"
        else:
            how = f"the whole base in {doc['base_dtype']} (a .bin checkpoint) + one weight in float32"
        return f"~{human_bytes(doc['planned_peak_bytes'])} peak beyond the libraries: {how}"


XS = XSMethod()
