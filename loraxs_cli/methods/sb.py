"""LoRA-SB: B = P, A = Q^T (both orthonormal) from the truncated SVD of the approximated first
full-fine-tuning step dW ~ P S Q^T on a gradient sample of the training data (the math: loraxs_cli/sb.py);
R0 = diag(S) and the scaling is 1, so training starts at W + rank_r(dW).

The recipe names the gradient sample (data sha256, sample size, seed, eta, ...); the compute step runs
the gradient pass. Its defaults live in method_defaults.SB_DEFAULTS.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..data import (
    Example,
    check_task,
    collate,
    encode,
    label_names,
    pad_id_of,
    stratified_split,
)
from ..datasources import DataSpec, as_spec, open_source, open_stream
from ..errors import BadInputError, UsageError
from ..estimate import human_bytes
from ..method_defaults import SB_DEFAULTS
from ..models import backbone, head_kwargs, load_model, load_tokenizer
from ..sb import (
    ACCUM_DTYPES,
    GRAD_MODES,
    STEPS,
    SBSettings,
    average_gradients,
    parse_accum_dtype,
    plan_groups,
    sb_factors,
)
from .base import Compute, Method


def parse_bytes(text: str | int) -> int:
    """'512MiB', '2GiB', '1.5G', '800MB' (binary units) or a plain byte count."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
        if not match:
            raise BadInputError(f"not a memory size: {text!r} (use e.g. 512MiB or 2GiB)")
        size = int(float(match[1]) * (1 << (10 * " kmgt".index(match[2] or " "))))
    if size <= 0:
        raise BadInputError(f"memory size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class OfficialEta:
    """The official LoRA-SB code's eta: `lr / (warmup_ratio * len(gradient_loader) * epochs)`.

    train_arithmetic.py, train_cr.py and train_glue.py compute it so; len(gradient_loader) is the
    number of batches of the training rows at the gradient pass's batch size (`--sb-batch-size`).
    """

    lr: float
    warmup_ratio: float | None
    epochs: float

    def eta(self, train_rows: int, batch_size: int) -> float:
        if not (self.warmup_ratio or 0) > 0:
            raise UsageError("--sb-official-eta needs --warmup-ratio > 0 (eta = lr / (warmup_ratio * ...))")
        return self.lr / (self.warmup_ratio * math.ceil(train_rows / batch_size) * self.epochs)


@dataclass(frozen=True)
class SBInit:
    """Where LoRA-SB's approximated first step comes from. All but the memory budget are recorded."""

    data: str | DataSpec  # a file, or any source datasources.py reads (train passes its DataSpec)
    task: str
    samples: int = SB_DEFAULTS.samples
    eta: float = SB_DEFAULTS.eta
    batch_size: int = SB_DEFAULTS.batch_size
    max_length: int = SB_DEFAULTS.max_length
    seed: int = 0
    held_out_split: float = 0.0  # rows `train --eval-split` holds out are never in the sample
    # bytes of gradient accumulators per pass (not part of the recipe)
    max_grad_memory: int = parse_bytes(SB_DEFAULTS.max_grad_memory)
    grad_mode: str = SB_DEFAULTS.grad_mode  # "train": dropout on during the pass, as the official code
    accum_dtype: str = SB_DEFAULTS.accum_dtype  # "bfloat16": the official code's sums on a bf16 model
    step: str = SB_DEFAULTS.step  # "sign": the official -eta * sign(G)
    official_eta: OfficialEta | None = None  # set: eta comes from the training schedule instead
    # Not recorded: where the gradient pass's model comes from. None: load_model (each process a whole
    # copy); a callable plan -> model: train's FSDP2-sharded base (--distributed fsdp), built once.
    model: Callable | None = None


def sb_request(request, sb: SBInit, all_reduce: Callable | None = None, shard: tuple[int, int] = (0, 1)):
    """The request with LoRA-SB's recipe fields, and the compute step for ensure_factors.

    `shard` = (rank, world) splits the sample across torchrun processes; `all_reduce` sums their
    accumulators so every process gets identical factors.
    """
    check_task(sb.task)
    if sb.samples <= 0 or sb.batch_size <= 0 or sb.max_length <= 0:
        raise BadInputError("LoRA-SB: --samples, --batch-size and --max-length must be positive")
    if sb.grad_mode not in GRAD_MODES:
        raise BadInputError(f"unknown --sb-grad-mode {sb.grad_mode!r}: use {' or '.join(GRAD_MODES)}")
    if sb.step not in STEPS:
        raise BadInputError(f"unknown --sb-step {sb.step!r}: use {' or '.join(STEPS)}")
    sb = replace(sb, accum_dtype=parse_accum_dtype(sb.accum_dtype))
    rows, labels, train_rows, source = _sample_rows(sb)
    if sb.official_eta is not None:
        if train_rows is None:
            raise UsageError("--sb-official-eta counts the training rows, which --streaming does not know")
        sb = replace(sb, eta=sb.official_eta.eta(train_rows, sb.batch_size))
    if not sb.eta > 0:
        raise BadInputError(f"LoRA-SB: --sb-lr must be positive, got {sb.eta}")
    settings = SBSettings(eta=sb.eta, step=sb.step)
    extra = {
        "data_sha256": source.content_id(),  # a file's sha256; a dataset's identity (datasources.py)
        "samples": len(rows),
        "task": sb.task,
        "labels": labels,
        "seed": sb.seed,
        "batch_size": sb.batch_size,
        "max_length": sb.max_length,
        "held_out_split": sb.held_out_split,
        **settings.as_dict(),
        # Recorded only when not the default: the recipes (cache entries) of the defaults are unchanged.
        **({"grad_mode": sb.grad_mode} if sb.grad_mode != SB_DEFAULTS.grad_mode else {}),
        **({"accum_dtype": sb.accum_dtype} if sb.accum_dtype != SB_DEFAULTS.accum_dtype else {}),
        **({"columns": source.spec.columns} if source.spec.columns else {}),
        **({"sample": "first rows of the stream"} if source.spec.streaming else {}),
    }

    def compute(plan, on_module) -> tuple[dict, dict]:
        return _compute(plan, sb, rows, labels, settings, all_reduce, shard, on_module, train_rows)

    return replace(request, method=SB.name, extra={"sb": extra}), compute


def _sample_rows(sb: SBInit) -> tuple[list, list[str] | None, int | None, object]:
    """The seeded gradient sample (`samples` rows of the training part of the data), the label names,
    the number of training rows and the source (datasources.Source). With --streaming the sample is the
    stream's first `samples` rows, in the order training reads them; the number of rows is not known."""
    spec = as_spec(sb.data)
    if spec.streaming:
        stream = open_stream(spec)
        return stream.first_rows(sb.samples), stream.label_names(sb.task), None, stream.source
    source = open_source(spec)
    rows = source.rows()
    labels = label_names(rows, sb.task)
    if sb.held_out_split:
        rows, _ = stratified_split(rows, sb.held_out_split, sb.seed, sb.task)
    chosen = sorted(random.Random(sb.seed).sample(range(len(rows)), min(sb.samples, len(rows))))
    return [rows[i] for i in chosen], labels, len(rows), source


def _compute(plan, sb: SBInit, rows, labels, settings, all_reduce, shard, on_module, train_rows):
    tokenizer = load_tokenizer(plan.base.resolved)
    examples = encode(rows, tokenizer, sb.task, max_length=sb.max_length, labels=labels)
    task = sb.task
    if task == "preference":  # the gradient of the chosen answers' language-model loss (README)
        examples, task = [Example(e.input_ids, labels=e.labels) for e in examples], "causal-lm"
    rank, world = shard
    mine = examples[rank::world]
    device = torch.device(plan.request.device or "cpu")
    passes = None
    if sb.model is not None:
        # Sharded (FSDP2): every forward and backward is collective, so every process runs as many
        # passes as the first, which has the most examples; the sharded base has the fresh head of
        # `train --seed` (fsdp.build_sharded seeds it so).
        if len(examples) < world:
            raise BadInputError(
                f"LoRA-SB: {len(examples)} sample example(s) for {world} processes; raise --sb-samples"
            )
        passes = math.ceil(len(examples[0::world]) / sb.batch_size)
        model = sb.model(plan)
        device = next(model.parameters()).device
    else:
        torch.manual_seed(sb.seed)  # the same fresh task head that `train --seed` starts from
        model = load_model(plan.base.resolved, dtype=plan.base.weights_dtype, **head_kwargs(sb.task, labels))
        model.to(device)
    pad_id = pad_id_of(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id

    def batches():
        for start in range(0, len(mine), sb.batch_size):
            batch = collate(mine[start : start + sb.batch_size], pad_id, task)
            yield {k: v.to(device) for k, v in batch.items()}

    core = backbone(model)
    accum_dtype = ACCUM_DTYPES[sb.accum_dtype]
    gradients = average_gradients(
        model,
        core,
        plan.targets,
        batches,
        budget_bytes=sb.max_grad_memory,
        all_reduce=all_reduce,
        mode=sb.grad_mode,
        accum_dtype=accum_dtype,
        seed=sb.seed,
        passes=passes,
    )
    tensors, stats = sb_factors(gradients, core, plan.request.rank, settings, plan.request.svd, on_module)
    element_bytes = torch.empty((), dtype=accum_dtype).element_size()
    groups = len(plan_groups(plan.base.shapes(plan.targets), sb.max_grad_memory, element_bytes))
    record = {
        "examples": len(examples),
        "gradient_passes": groups,
        "grad_mode": sb.grad_mode,
        "accum_dtype": sb.accum_dtype,
        "step": settings.step,
        "eta": settings.eta,
    }
    if sb.official_eta is not None:
        record["eta_from"] = {
            "rule": "lr / (warmup_ratio * ceil(train_rows / batch_size) * epochs)",
            "lr": sb.official_eta.lr,
            "warmup_ratio": sb.official_eta.warmup_ratio,
            "epochs": sb.official_eta.epochs,
            "train_rows": train_rows,
            "batch_size": sb.batch_size,
        }
    return tensors, {"stats": stats, "sb": record}


def grad_plan(shapes: dict[str, tuple[int, int]], record: dict, budget: int) -> dict:
    """The gradient pass a dry run announces: passes over the sample, and the largest group's
    accumulator bytes, at the recipe's accumulator dtype and the memory budget."""
    accum_dtype = ACCUM_DTYPES[record.get("accum_dtype", SB_DEFAULTS.accum_dtype)]
    item = torch.empty((), dtype=accum_dtype).element_size()
    groups = plan_groups(shapes, budget, item)
    return {
        "gradient_passes": len(groups),
        "accumulator_bytes": max(sum(item * m * n for m, n in (shapes[t] for t in g)) for g in groups),
    }


class SBMethod(Method):
    name = "sb"
    title = "LoRA-SB"
    card_tag = "lora-sb"
    adapter_tags = ("lora-xs", "lora-sb")  # an SB adapter is an XS-shaped adapter (r x r R between B and A)
    factor_of = "dW"
    needs_data = True
    collective = True
    defaults = SB_DEFAULTS

    def scaling(self, rank: int, alpha: float | None) -> float:
        return 1.0  # the factors carry their own scale in R0 = diag(S)

    def adapter_alpha(self, rank: int, alpha: float | None) -> float:
        return float(rank)

    def initial_R(self, factors: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {m: torch.diag(f["S"]) for m, f in factors.items()}

    def prepare(self, request, settings=None, *, all_reduce=None, shard=(0, 1)) -> tuple[object, Compute]:
        if not isinstance(settings, SBInit):
            raise TypeError("LoRA-SB needs its gradient sample: pass an SBInit as settings")
        return sb_request(request, settings, all_reduce, shard)

    def compute(self, plan, on_module=None) -> tuple[dict, dict]:
        raise UsageError("LoRA-SB factors need their gradient sample: use the compute step of prepare()")

    def record(self, recipe_extra: dict | None) -> dict | None:
        return (recipe_extra or {}).get("sb")

    def adapter_extra(self, recipe_extra: dict | None) -> dict:
        record = self.record(recipe_extra)
        return {"sb": record} if record else {}

    def describe(self, record: dict | None, style: str = "cache") -> str:
        if not record:
            return ""
        if style == "inspect":
            return f"{record['samples']} samples of data {record['data_sha256'][:12]}, eta {record['eta']:g}"
        return f"{record['samples']} samples of {record['data_sha256'][:8]}, eta {record['eta']}"

    def plan_fields(self, plan, grad_budget: int | None) -> dict:
        record = plan.recipe.extra["sb"]
        return {"sb": record, **grad_plan(plan.base.shapes(plan.targets), record, grad_budget)}

    def memory_text(self, doc: dict) -> str:
        accum = doc["sb"].get("accum_dtype", SB_DEFAULTS.accum_dtype)
        return (
            f"a training step + {human_bytes(doc['accumulator_bytes'])} of {accum} gradient "
            f"accumulators ({doc['gradient_passes']} pass(es) over {doc['sb']['samples']} samples)"
        )

    def recompute_args(self, record: dict | None, task: str | None) -> list[str]:
        # LoRA-SB factors come from a gradient on training data: the same data and settings redo them.
        sb = record or {}
        words = ["--method", "sb", "--data", "DATA", "--task", str(sb.get("task") or task)]
        for key, flag in (("samples", "--samples"), ("eta", "--sb-lr"), ("batch_size", "--batch-size")):
            if key in sb:
                words += [flag, str(sb[key])]
        return words

    def data_note(self, record: dict | None) -> str:
        sha = str((record or {}).get("data_sha256", "?"))[:12]
        return f"; DATA is the training data, sha256 {sha}, or rerun the `loraxs train` that made them"


SB = SBMethod()
