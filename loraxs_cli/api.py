"""The public Python API: LoRA-XS (and LoRA-SB) adapters in your own training code.

    from transformers import AutoModelForCausalLM
    from loraxs_cli import api

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    api.attach(model, rank=16)               # factors from the shared cache, computed on a miss
    ...                                      # train it: your loop, transformers.Trainer, TRL
    api.save_adapter(model, "my-adapter")    # what `loraxs eval/merge/convert/push` read

Each function is a thin layer over the core the CLI runs, so a script and the CLI agree: `attach` makes
the factor request `loraxs init`/`train` make for the same base and settings (the same cache entry,
computed once), and `save_adapter` writes the directory `loraxs train` writes (RUN/adapter: the same
loraxs_config.json fields and model card). `LoraXSCallback` saves adapters from inside a
`transformers.Trainer` (TRL's trainers are Trainers) at each checkpoint and at the end. docs/api.md has
complete examples for the Trainer and TRL.

The model is changed in place: each target layer becomes an `XSLinear` (layer.py), every base weight is
frozen and only the r x r matrices R (and a classifier's head) train. What `attach` recorded lives in
`model.loraxs` (an `Attached`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.models.auto import modeling_auto
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import adapter as adapter_format
from .adapter import AdapterConfig, adapter_factors, apply_adapter, check_base, new_config
from .cache import FactorCache, FactorEntry
from .convert import export_peft
from .errors import UsageError
from .factors import SVDSettings
from .initialize import FactorRequest, describe_base, ensure_factors, plan_factors
from .layer import XSLinear, inject, remove, xs_modules
from .method_defaults import XS_DEFAULTS
from .methods import get_method
from .methods.sb import SBInit
from .models import backbone, parse_targets
from .sources import load_one
from .train.setup import train_head

__all__ = [
    "Attached",
    "LoraXSCallback",
    "XSLinear",
    "attach",
    "export_peft_lora",
    "load_adapter",
    "merge_into",
    "save_adapter",
    "trainable_parameters",
]

ADAPTER_DIR_NAME = "loraxs_adapter"  # LoraXSCallback's adapter inside checkpoint-N/ and the output dir


# The adapter config's `extra` sections that describe one training run (what `loraxs train` writes);
# the rest (a method's recipe fields) belongs to the factors and stays with the adapter.
RUN_EXTRA = ("data", "metrics", "training")


@dataclass
class Attached:
    """What `attach` or `load_adapter` put on a model (`model.loraxs`): the adapter's config without its
    trained numbers (base, factor set, method, rank, alpha, targets, task, labels), the names of the
    trained head parameters, and where the frozen factors come from: the cache entry, or the factors an
    adapter embedded (`save_adapter(embed_factors=True)` stores them)."""

    config: AdapterConfig
    head: list[str]
    entry: FactorEntry | None
    embedded: dict[str, dict[str, torch.Tensor]] | None = None
    cache_hit: bool = True  # attach: the factors were in the cache already (False: computed now)

    def factors(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.embedded is not None:
            return self.embedded
        return self.entry.load(self.config.rank, self.config.modules)


def attach(
    model: torch.nn.Module,
    rank: int = 16,
    method: str = "xs",
    targets: str | list[str] | None = None,
    base: str | None = None,
    task: str | None = None,
    *,
    alpha: float | None = None,
    labels: list[str] | None = None,
    data: str | None = None,
    sb: Mapping | None = None,
    svd: str = "torch",
    niter: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
    init_std: float = XS_DEFAULTS.init_std,
    revision: str | None = None,
    device: str | None = None,
) -> torch.nn.Module:
    """Put LoRA-XS (or LoRA-SB) layers on `model` and freeze everything but R (and a classifier's head).

    `base`: the model's checkpoint as `loraxs` names a base (a directory, a Hugging Face id, a .gguf
    file); default `model.name_or_path` (what `from_pretrained` was given). Its fingerprint identifies
    the factors and the adapter, so `model` must hold that checkpoint's weights (in any dtype: the
    weights are read in the model's dtype, as `loraxs train --dtype`). `targets`: names, suffixes, globs
    or "all-linear" (default: the architecture's, as the CLI). `task`: "causal-lm", "seq-cls" or
    "regression"; default from the model's class (a `...ForCausalLM` or a `...ForSequenceClassification`,
    regression when its config's problem_type says so). `labels`: a classifier's class names in index
    order (default: the config's id2label).

    The factors come from the shared cache ($LORAXS_HOME), computed on a miss under the cache's lock:
    the entry `loraxs init BASE --rank RANK` (same `--targets`, `--svd`, `--niter`, `--oversample`,
    `--seed`, `--dtype`) makes or uses. R starts as `loraxs train --seed SEED --init-std INIT_STD` starts
    it. LoRA-SB (`method="sb"`) computes its factors from a gradient pass over `data` (a file or any
    dataset `loraxs train --data` reads), `sb` taking methods.sb.SBInit's settings (samples, eta,
    batch_size, max_length, grad_mode, accum_dtype, step); it is the entry `loraxs init BASE --method sb
    --data DATA` makes with the same settings. Returns `model` (changed in place).
    """
    spec = base or _base_of(model)
    chosen = get_method(method, UsageError)
    task = task or _task_of(model)
    labels = labels if labels is not None else _labels_of(model, task)
    dtype = str(_dtype_of(model)).removeprefix("torch.")
    where = _device_of(model)
    request = FactorRequest(
        model=spec,
        rank=rank,
        targets=parse_targets(targets),
        method=method,
        svd=SVDSettings.for_backend(svd, niter, oversample, seed),
        dtype=dtype,
        device=device or (str(where) if where.type == "cuda" else None),
        revision=revision,
    )
    request, compute = chosen.prepare(request, _method_settings(chosen, data, task, seed, sb))
    plan = plan_factors(request)
    entry, hit = ensure_factors(plan, compute=compute)
    factors = entry.load(rank, plan.targets)
    inject(
        backbone(model),
        {m: (f["A"].to(where), f["B"].to(where)) for m, f in factors.items()},
        scaling=chosen.scaling(rank, alpha),
        R=chosen.initial_R(factors),
        init_std=init_std,
        seed=seed,
    )
    head = train_head(model, task)
    recipe = entry.meta.get("recipe", {}).get("extra")
    config = new_config(
        plan.base,
        entry,
        rank=rank,
        alpha=alpha,
        modules=sorted(factors),
        task=task,
        labels=labels,
        extra=chosen.adapter_extra(recipe),
    )
    model.loraxs = Attached(config, head, entry, cache_hit=hit)
    return model


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, by name: every R (`...<module>.R`) and a classifier's head. Their count:
    `sum(p.numel() for p in trainable_parameters(model).values())`."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    metrics: Mapping | None = None,
    training: Mapping | None = None,
    data: Mapping | None = None,
    embed_factors: bool = False,
    force: bool = True,
) -> Path:
    """Write the model's adapter (its R matrices and trained head) as a loraxs adapter directory, the one
    `loraxs train` writes as RUN/adapter: `loraxs eval`, `merge`, `convert`, `push` and `pack` read it.

    `metrics` (such as {"steps": 100, "train_loss": 1.23}), `training` (lr, batch_size, ...) and `data`
    (a description of the training data) go into the config's `extra` and the model card, under the
    names `loraxs train` uses. `embed_factors`: also store the frozen factors (self-contained, as
    `train --embed-factors`). `force` replaces an existing adapter directory. Returns the directory."""
    model = _unwrapped(model)
    state = _attached(model)
    layers = xs_modules(backbone(model))
    R = {name: layers[name].R for name in state.config.modules}
    params = dict(model.named_parameters())
    head = {name: params[name] for name in state.head}
    run = dict(zip(RUN_EXTRA, (data, metrics, training), strict=True))
    extra = {key: dict(value) for key, value in run.items() if value}  # in `loraxs train`'s order
    config = replace(state.config, extra={**extra, **state.config.extra}, tensors_sha256={}, created="")
    factors = state.factors() if embed_factors else None
    return adapter_format.save_adapter(out_dir, config, R, head=head, factors=factors, force=force)


def load_adapter(
    model: torch.nn.Module, adapter_dir: str | Path, *, base: str | None = None, trainable: bool = False
) -> torch.nn.Module:
    """Put a saved adapter (a directory, `PACK::NAME`, a Hub id) on `model`: its factors, R and task head.

    The adapter must have been trained on this base (`base`, default `model.name_or_path`): another
    fingerprint is refused (IncompatibleError), as `loraxs eval` refuses it. `trainable`: R (and the head)
    train on from here, else everything stays frozen. Returns `model` (changed in place); `save_adapter`
    writes it again."""
    adapter = load_one(adapter_dir)
    described = describe_base(base or _base_of(model))
    check_base(adapter, described.fingerprint, described.resolved.spec)
    apply_adapter(model, adapter)
    head = sorted(adapter.head)
    for name, param in model.named_parameters():
        param.requires_grad_(trainable and (name in head or name.endswith(".R")))
    extra = {k: v for k, v in adapter.config.extra.items() if k not in RUN_EXTRA}
    config = replace(adapter.config, extra=extra, tensors_sha256={}, created="")
    if adapter.factors is not None:
        model.loraxs = Attached(config, head, None, adapter_factors(adapter))
    else:
        model.loraxs = Attached(config, head, FactorCache().get(config.factors.get("id", "")))
    return model


def merge_into(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapter into the base weights in memory, W' = W + s B R A (float32, cast back to the
    weight's dtype, as `loraxs merge`), and put the plain layers back: the result is a plain transformers
    model that computes what the adapted one did (`save_pretrained` it, or serve it). Returns `model`."""
    model = _unwrapped(model)
    _attached(model)
    remove(backbone(model), merge=True)
    del model.loraxs
    return model


def export_peft_lora(
    model_or_dir: torch.nn.Module | str | Path,
    out_dir: str | Path,
    *,
    pad_rank: int | None = None,
    force: bool = False,
) -> dict:
    """Write a PEFT LoRA directory with the adapter's exact update (lora_A = R A, lora_B = B): what
    `loraxs convert ADAPTER --to peft-lora` writes. `model_or_dir`: a model with an adapter on, or an
    adapter directory. Returns convert.export_peft's summary."""
    if not isinstance(model_or_dir, torch.nn.Module):
        return export_peft(model_or_dir, out_dir, pad_rank=pad_rank, force=force)
    with tempfile.TemporaryDirectory(prefix="loraxs-export-") as tmp:
        saved = save_adapter(model_or_dir, Path(tmp) / "adapter")
        return export_peft(saved, out_dir, pad_rank=pad_rank, force=force)


class LoraXSCallback(TrainerCallback):
    """A `transformers.TrainerCallback` that writes loraxs adapters: at each checkpoint into
    `checkpoint-N/<name>` (beside the Trainer's own files, so `save_total_limit` rotates it with them),
    and at the end of training into `out_dir` (default `<output_dir>/<name>`). The model must have gone
    through `attach` (or `load_adapter`). Each adapter records the step, the last logged training loss
    and the TrainingArguments' lr, batch size, accumulation, seed and schedule, as `loraxs train` records
    its own. Only the main process writes."""

    def __init__(
        self, out_dir: str | Path | None = None, *, name: str = ADAPTER_DIR_NAME, embed_factors=False
    ):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.name = name
        self.embed_factors = embed_factors
        self.saved: list[Path] = []  # every adapter written, in order

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self._write(checkpoint / self.name, args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(self.out_dir or Path(args.output_dir) / self.name, args, state, model)

    def _write(self, out: Path, args, state, model) -> None:
        if not state.is_world_process_zero or model is None:
            return
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        metrics = {"steps": state.global_step}
        if losses:
            metrics["train_loss"] = round(float(losses[-1]), 4)
        training = {
            "lr": args.learning_rate,
            "head_lr": args.learning_rate if _attached(_unwrapped(model)).head else None,  # one lr for all
            "batch_size": args.per_device_train_batch_size,
            "grad_accum": args.gradient_accumulation_steps,
            "seed": args.seed,
            "schedule": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)),
        }
        self.saved.append(
            save_adapter(model, out, metrics=metrics, training=training, embed_factors=self.embed_factors)
        )


# ----------------------------------------------------------------------------------------------


def _attached(model: torch.nn.Module) -> Attached:
    state = getattr(model, "loraxs", None)
    if not isinstance(state, Attached):
        raise UsageError("this model has no loraxs adapter: call loraxs_cli.api.attach(model, ...) first")
    return state


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or similar) wrapper."""
    while not hasattr(model, "loraxs") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _base_of(model: torch.nn.Module) -> str:
    spec = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", ""
    )
    if not spec:
        raise UsageError(
            "the model does not say which checkpoint it was loaded from: pass base=PATH_OR_HUB_ID "
            "(the directory, Hugging Face id or .gguf file of its weights)"
        )
    return str(spec)


def _task_of(model: torch.nn.Module) -> str:
    def names(mapping) -> set[str]:
        found = set()
        for value in mapping.values():
            found.update(value if isinstance(value, list | tuple) else [value])
        return found

    kind = type(model).__name__
    if kind in names(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        problem = getattr(model.config, "problem_type", None)
        return "regression" if problem == "regression" or model.config.num_labels == 1 else "seq-cls"
    if kind in names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "causal-lm"
    raise UsageError(f"cannot tell the task of a {kind}: pass task='causal-lm', 'seq-cls' or 'regression'")


def _labels_of(model: torch.nn.Module, task: str) -> list[str] | None:
    if task != "seq-cls":
        return None
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(model.config.num_labels)]


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _method_settings(method, data, task: str, seed: int, sb: Mapping | None):
    """What the method's `prepare` takes besides the request (methods/): LoRA-SB's gradient sample."""
    if not method.needs_data:
        if data is not None or sb:
            raise UsageError(
                "data= and sb= are for method='sb' (LoRA-XS factors come from the weights alone)"
            )
        return None
    if data is None:
        raise UsageError(
            "method='sb' needs data=: LoRA-SB factors come from a gradient pass on training data "
            "(`loraxs init BASE --method sb --data FILE` computes the same entry from the command line)"
        )
    return SBInit(data=data, task=task, seed=seed, **dict(sb or {}))
