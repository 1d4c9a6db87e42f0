"""Streaming merge: fold an adapter into its base, W' = W + s * B R A, one safetensors shard at a time.

Peak memory is about one shard (read, merged, written) plus the adapter's factors: the model is
never loaded whole. The output keeps the input's shard layout and index, gets the base's config,
tokenizer and generation files and a model card, and appears only when complete (it is written to
a temporary sibling directory and renamed at the end, fsutil.atomic_dir). An --out that is, holds
or lies inside the base model, the adapter or the factor cache is refused before anything is
written, with or without --force.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from .adapter import (
    adapter_factors,
    apply_adapter,
    card_base_name,
    card_front_matter,
    check_base,
    trained_quantized,
)
from .errors import BadInputError, IncompatibleError
from .fsutil import atomic_dir, check_output, loads_json, raise_if_interrupted
from .initialize import describe_base
from .linear import merge_delta
from .methods import method_of
from .models import ResolvedModel, head_kwargs, load_model, load_tokenizer, parse_dtype, skeleton
from .paths import factors_root
from .sources import load_one, spec_path
from .weights import INDEX_FILE, safetensors_shards, weight_key

CARD_FILE = "README.md"
# Files of a model directory that the merge rewrites itself (everything else is copied).
_REWRITTEN_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
VERIFY_SAMPLES = (
    "The quick brown fox jumps over the lazy dog.",
    "Adapters fold into the base weights without changing the outputs.",
    "1, 2, 3, 4, 5, 6, 7, 8",
)


@dataclass
class MergePlan:
    base: object  # initialize.BaseInfo
    adapter: object  # adapter.Adapter
    out: Path
    shards: list[Path]
    index: Path | None
    targets: dict[str, str]  # module -> checkpoint key of its weight
    head: dict[str, str | None]  # head param -> checkpoint key (None: added to the last shard)
    key_shard: dict[str, str]  # checkpoint key -> shard file name
    dtype: torch.dtype | None  # None: keep each tensor's dtype
    checkpoint_bytes: int
    largest_shard_bytes: int
    factor_bytes: int
    conv1d: set[str] = field(default_factory=set)

    @property
    def estimated_peak_bytes(self) -> int:
        """Read + merged copy of the largest shard, its serialised form, and the factors."""
        return 3 * self.largest_shard_bytes + self.factor_bytes

    def as_dict(self) -> dict:
        return {
            "model": self.base.resolved.spec,
            "adapter": str(self.adapter.path),
            "out": str(self.out),
            "shards": [p.name for p in self.shards],
            "target_modules": len(self.targets),
            "head": sorted(self.head),
            "head_added": sorted(k for k, v in self.head.items() if v is None),
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype else "original",
            "checkpoint_bytes": self.checkpoint_bytes,
            "largest_shard_bytes": self.largest_shard_bytes,
            "factor_bytes": self.factor_bytes,
            "estimated_peak_bytes": self.estimated_peak_bytes,
        }


def plan_merge(model: str, adapter_dir: str, out: str | Path, *, dtype: str | None = None, force=False):
    """Check that the adapter (any single-adapter spec, sources.load_one) belongs to the base and map
    every target to its checkpoint tensor."""
    adapter = load_one(adapter_dir)
    base = describe_base(model)
    if base.resolved.gguf_file:
        raise BadInputError(
            f"{model}: merge writes safetensors shards and needs a safetensors base, not GGUF; dequantize "
            "the GGUF into a model directory once (from_pretrained with gguf_file=, then from_config + "
            "load_state_dict, then save_pretrained: README 'GGUF bases') and train on that directory"
        )
    check_base(adapter, base.fingerprint, model)
    out = check_output(out, merge_inputs(base.resolved.path, adapter_dir), force=force)
    shards, index = safetensors_shards(base.resolved.path, model)
    key_shard: dict[str, str] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            key_shard.update(dict.fromkeys(handle.keys(), shard.name))
    prefix = getattr(skeleton(base.config), "base_model_prefix", "")
    targets = {m: weight_key(m, prefix, key_shard, model) for m in adapter.config.modules}
    unknown = sorted(set(targets) - set(base.modules))
    if unknown:
        raise IncompatibleError(f"adapter module {unknown[0]} is not a linear layer of {model}")
    head = {name: (name if name in key_shard else None) for name in adapter.head}
    sizes = [p.stat().st_size for p in shards]
    rank = adapter.config.rank
    factor_bytes = sum(
        rank * (i.out_features + i.in_features) * 4 for m, i in base.modules.items() if m in targets
    )
    return MergePlan(
        base=base,
        adapter=adapter,
        out=out,
        shards=shards,
        index=index,
        targets=targets,
        head=head,
        key_shard=key_shard,
        dtype=parse_dtype(dtype),
        checkpoint_bytes=sum(sizes),
        largest_shard_bytes=max(sizes),
        factor_bytes=factor_bytes,
        conv1d={m for m in targets if base.modules[m].is_conv1d},
    )


def merge_inputs(base_dir: Path, adapter_spec: str | Path) -> dict[str, Path]:
    """What a merge reads, which its --out may not overlap: the base, the adapter, the factor cache."""
    return {
        "the base model's directory": base_dir,
        "the adapter": spec_path(adapter_spec),
        "the factor cache": factors_root(),
    }


def run_merge(
    plan: MergePlan,
    *,
    verify: bool = False,
    quantize: str | None = None,
    on_shard: Callable[[str], None] | None = None,
    on_verify: Callable[[], None] | None = None,
) -> dict:
    """Write the merged model; with `verify`, compare its logits to base + adapter before publishing, and
    also to the `quantize`d base + adapter (default: the quantization the adapter was trained on). The
    merge itself always writes into the full-precision weights: the adapter does not depend on it."""
    started = time.perf_counter()
    trained = trained_quantized(plan.adapter.config)
    factors = adapter_factors(plan.adapter)
    # Published only when complete, never after Ctrl-C; the temporary goes on any failure.
    with atomic_dir(plan.out) as tmp:
        total_bytes = 0
        for i, shard in enumerate(plan.shards):
            extra = _added_head(plan) if i == len(plan.shards) - 1 else {}
            total_bytes += _merge_shard(plan, factors, shard, tmp / shard.name, extra)
            raise_if_interrupted()  # stop at the next shard even if a library swallowed the Ctrl-C
            if on_shard:
                on_shard(shard.name)
        del factors
        _write_index(plan, tmp, total_bytes)
        _copy_model_files(plan.base.resolved.path, tmp)
        _update_config(plan, tmp / "config.json")
        report = {"merged_modules": len(plan.targets), "head": sorted(plan.head), "bytes": total_bytes}
        if trained:
            report["trained_quantized"] = trained
        if verify:
            if on_verify:
                on_verify()
            report["verify"] = verify_merge(plan, tmp, quantize=quantize or trained)
        (tmp / CARD_FILE).write_text(model_card(plan, report.get("verify")))
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["out"] = str(plan.out)
    return report


def _merge_shard(plan: MergePlan, factors: dict, src: Path, dst: Path, extra: dict) -> int:
    by_key = {key: module for module, key in plan.targets.items()}
    head_by_key = {key: name for name, key in plan.head.items() if key is not None}
    scaling = plan.adapter.config.scaling
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(src), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            tensor = handle.get_tensor(key)
            if key in by_key:
                module = by_key[key]
                tensor = merged_weight(
                    tensor, factors[module], plan.adapter.R[module], scaling, transposed=module in plan.conv1d
                )
            elif key in head_by_key:
                tensor = plan.adapter.head[head_by_key[key]].to(tensor.dtype)
            tensors[key] = tensor
    tensors.update(extra)
    if plan.dtype is not None:
        tensors = {k: v.to(plan.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(dst), metadata=metadata)
    written = sum(t.numel() * t.element_size() for t in tensors.values())
    tensors.clear()
    return written


def merged_weight(
    weight: torch.Tensor, parts: dict, R: torch.Tensor, scaling: float, *, transposed: bool = False
) -> torch.Tensor:
    """W + s * B R A in float32, cast back to W's dtype; `transposed` for GPT-2 Conv1D (stores W^T)."""
    return merge_delta(weight, parts["A"], parts["B"], R, scaling, transposed=transposed)


def _added_head(plan: MergePlan) -> dict[str, torch.Tensor]:
    """Head parameters the base checkpoint lacks (a causal LM base with a trained classifier)."""
    dtype = plan.base.weights_dtype
    return {name: plan.adapter.head[name].to(dtype) for name, key in plan.head.items() if key is None}


def _write_index(plan: MergePlan, out_dir: Path, total_bytes: int) -> None:
    if plan.index is None:
        added = [name for name, key in plan.head.items() if key is None]
        if added and len(plan.shards) > 1:  # pragma: no cover - several shards always have an index
            raise BadInputError("a sharded checkpoint without an index")
        return
    index = loads_json(plan.index.read_text())
    last = plan.shards[-1].name
    for name, key in plan.head.items():
        if key is None:
            index["weight_map"][name] = last
    index.setdefault("metadata", {})["total_size"] = total_bytes
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _copy_model_files(src: Path, dst: Path) -> None:
    """Config, tokenizer, generation config, chat template...: every top-level file but weights and card."""
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in (INDEX_FILE, CARD_FILE):
            continue
        if path.name.endswith(_REWRITTEN_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, dst / path.name)


def _update_config(plan: MergePlan, config_path: Path) -> None:
    """Record a new dtype, and make a trained classifier loadable as one (class, labels)."""
    config = loads_json(config_path.read_text())
    if plan.dtype is not None:
        name = str(plan.dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    task, labels = plan.adapter.config.task, plan.adapter.config.labels
    if task in ("seq-cls", "regression"):
        cls_name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.get("model_type"))
        if cls_name:
            config["architectures"] = [cls_name]
        if task == "regression":
            labels = ["LABEL_0"]
            config["problem_type"] = "regression"
        elif labels:
            config["problem_type"] = "single_label_classification"
        if labels:
            config["id2label"] = {str(i): name for i, name in enumerate(labels)}
            config["label2id"] = {name: i for i, name in enumerate(labels)}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_card(plan: MergePlan, verified: dict | None) -> str:
    cfg = plan.adapter.config
    base, _ = card_base_name(cfg.base)  # the hub id, else the directory's name: never a local path
    lines = [
        *card_front_matter(cfg.base, ("loraxs", "merged", method_of(cfg.method).card_tag)),
        f"# {base} with a merged LoRA-{cfg.method.upper()} adapter",
        "",
        f"- adapter: {plan.adapter.path} (rank {cfg.rank}, alpha {cfg.alpha:g}, "
        f"{len(cfg.modules)} modules, task {cfg.task or 'none'})",
        f"- merged as W' = W + {cfg.scaling:g} * B R A in float32, written as "
        f"{str(plan.dtype).removeprefix('torch.') if plan.dtype else 'the original dtype'}",
        f"- base fingerprint: {cfg.base.get('fingerprint')}",
    ]
    if plan.head:
        lines.append(f"- trained task head: {', '.join(sorted(plan.head))}")
    trained = trained_quantized(cfg)
    if trained:
        lines.append(f"- {QUANTIZED_NOTE.format(kind=trained)}")
    if verified:
        lines.append(
            f"- verified: max |logit difference| {verified['max_abs_diff']:.3g} "
            f"on {verified['samples']} samples (relative {verified['relative_diff']:.3g})"
        )
    quantized = (verified or {}).get("quantized")
    if quantized:
        lines.append(
            f"- against the {quantized['quantize']}-quantized base + adapter: max |logit difference| "
            f"{quantized['max_abs_diff']:.3g} (relative {quantized['relative_diff']:.3g}, tolerance "
            f"{quantized['tolerance']:g}): the quantization's own error"
        )
    lines += ["", "Produced by `loraxs merge`. Load it like the base model; it needs no adapter code.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# --verify: the merged model must give the logits of base + adapter


def verify_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance on max |logit difference|: rounding W' to 16 bits is the dominant error."""
    return 1e-3 if dtype == torch.float32 else 5e-2


# The merged model against the quantized base + adapter: the difference is the quantization's own error,
# relative to max |logit|. Measured on SmolLM2-135M (CPU, float32 compute, the three VERIFY_SAMPLES, max
# |logit| about 34) with adapters of 20 steps trained on that quantized base: int8 0.10 and 0.17 (max
# |diff| 3.3 and 5.7), nf4 0.31 and 0.33 (10.8, 11.9); the base alone against its quantized self: int8
# 0.15, nf4 0.39. The tolerance is about twice the largest. The exact check is the first one (merged vs
# full-precision base + adapter, verify_tolerance); this one says the merged model is what was trained,
# up to the quantization.
QUANTIZED_VERIFY_TOLERANCE = {"int8": 0.35, "nf4": 0.8}
QUANTIZED_NOTE = (
    "the adapter was trained on the base quantized to {kind} (`train --quantize {kind}`); it is merged "
    "into the full-precision weights (its factors are the full-precision base's: the adapter does not "
    "depend on the quantization)"
)


def verify_merge(plan: MergePlan, merged_dir: Path, quantize: str | None = None) -> dict:
    """Load base + adapter and the merged model in float32; compare their outputs on sample inputs. With
    `quantize`, also compare the merged model with the quantized base + adapter (what was trained)."""
    adapter = plan.adapter
    task = adapter.config.task
    kwargs = head_kwargs(task, adapter.config.labels) if task else {"head": "base"}
    inputs = _sample_inputs(plan)
    torch.manual_seed(0)  # any untrained head is drawn the same way for both models
    reference_model = load_model(plan.base.resolved, dtype=torch.float32, **kwargs)
    apply_adapter(reference_model, adapter)
    reference = _outputs(reference_model, inputs)
    del reference_model
    torch.manual_seed(0)
    merged = load_model(ResolvedModel(str(merged_dir), "dir", merged_dir), dtype=torch.float32, **kwargs)
    got = _outputs(merged, inputs)
    diff = float((got - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    written = plan.dtype or plan.base.weights_dtype
    result = {
        "samples": int(inputs["input_ids"].shape[0]),
        "max_abs_diff": diff,
        "max_abs_ref": scale,
        "relative_diff": diff / scale,
        "tolerance": verify_tolerance(written),
    }
    if not result["relative_diff"] <= result["tolerance"]:
        raise IncompatibleError(
            f"--verify failed: the merged model's outputs differ from base + adapter by {diff:.3g} "
            f"(relative {diff / scale:.3g} > {result['tolerance']:g}); nothing was written"
        )
    if quantize:
        result["quantized"] = _verify_quantized(plan, kwargs, inputs, got, quantize)
    return result


def _verify_quantized(plan: MergePlan, kwargs: dict, inputs: dict, merged: torch.Tensor, kind: str) -> dict:
    """The merged model's outputs against the `kind`-quantized base (float32 compute) + adapter."""
    torch.manual_seed(0)
    model = load_model(plan.base.resolved, dtype=torch.float32, quantize=kind, **kwargs)
    apply_adapter(model, plan.adapter)
    reference = _outputs(model, inputs)
    del model
    diff = float((merged - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    result = {
        "quantize": kind,
        "max_abs_diff": diff,
        "relative_diff": diff / scale,
        "tolerance": QUANTIZED_VERIFY_TOLERANCE[kind],
    }
    if not result["relative_diff"] <= result["tolerance"]:
        raise IncompatibleError(
            f"--verify failed: the merged model's outputs differ from the {kind}-quantized base + adapter "
            f"by {diff:.3g} (relative {diff / scale:.3g} > {result['tolerance']:g}), more than the "
            "quantization explains; nothing was written"
        )
    return result


def _sample_inputs(plan: MergePlan) -> dict:
    try:
        tokenizer = load_tokenizer(plan.base.resolved)
        batch = tokenizer(
            list(VERIFY_SAMPLES), return_tensors="pt", padding=True, truncation=True, max_length=64
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    except BadInputError:  # a base without a tokenizer: random token ids
        vocab = int(getattr(plan.base.config, "vocab_size", 1000))
        ids = torch.randint(0, vocab, (len(VERIFY_SAMPLES), 16), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _outputs(model, inputs: dict) -> torch.Tensor:
    result = model(**inputs)
    values = getattr(result, "logits", None)
    if values is None:
        values = result.last_hidden_state
    mask = inputs["attention_mask"].bool()
    return values[mask] if values.dim() == 3 else values
