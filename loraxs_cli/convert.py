"""Conversions between loraxs adapters, PEFT LoRA directories and official LoRA-XS/LoRA-SB checkpoints.

- Export (exact): lora_A = R A, lora_B = B, same scaling s = alpha / r; zero rows/columns pad the
  rank to one that servers accept without changing B A.
- Import a PEFT LoRA (a projection): for the cached XS factors, R = (s_lora / s) B^+ (B_l A_l) A^+
  (= B^T dW V_r S_r^-1 for B = U_r, A = S_r V_r^T); the share of ||dW||_F^2 kept is reported.
- Import an official checkpoint (exact): its lora_A, lora_B and latent mapping are A, B and R; A and
  B are authoritative, so they are embedded in the adapter instead of taken from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInputError, IncompatibleError, UsageError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
VLLM_RANKS = (8, 16, 32, 64, 128, 256)
_PEFT_TASK = {
    "causal-lm": "CAUSAL_LM",
    "seq-cls": "SEQ_CLS",
    "regression": "SEQ_CLS",
    None: "FEATURE_EXTRACTION",
}
_LORAXS_TASK = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}
# GPT-2 style models store (in, out) weights: PEFT calls that fan_in_fan_out.
_FAN_IN_FAN_OUT = {"gpt2"}

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[\w-]+)?\.weight$")
_LATENT_KEY = re.compile(r"^(?P<module>.+)\.\w*lora_latent_mapping(?:\.[\w-]+)?\.weight$")


def head_prefix(model_type: str, task: str | None) -> str:
    """Where the backbone sits inside the model PEFT wraps: 'model.' in LlamaForCausalLM, '' in LlamaModel."""
    if task is None:
        return ""
    import transformers
    from transformers.models.auto import modeling_auto

    names = (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if task == "causal-lm"
        else modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    )
    cls = getattr(transformers, names.get(model_type, ""), None)
    prefix = getattr(cls, "base_model_prefix", "") if cls is not None else ""
    return f"{prefix}." if prefix else ""


# ----------------------------------------------------------------------------------------------
# loraxs -> PEFT LoRA


def export_peft(
    adapter_dir: str | Path, out: str | Path, *, pad_rank: int | None = None, force=False
) -> dict:
    """Write a PEFT LoRA directory that PEFT and vLLM load as is, with the adapter's exact update."""
    from safetensors.torch import save_file

    from .adapter import _replace_dir, adapter_factors, load_adapter

    adapter = load_adapter(adapter_dir)
    cfg = adapter.config
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise BadInputError(f"{out} exists; pass --force to replace it")
    rank = pad_rank or cfg.rank
    if rank < cfg.rank:
        raise UsageError(f"--pad-rank {pad_rank} is below the adapter's rank {cfg.rank}")
    factors = adapter_factors(adapter)
    model_type = cfg.base.get("model_type") or ""
    prefix = PEFT_PREFIX + head_prefix(model_type, cfg.task)
    tensors: dict[str, torch.Tensor] = {}
    for name in cfg.modules:
        lora_a, lora_b = peft_factors(factors[name], adapter.R[name], rank)
        tensors[f"{prefix}{name}.lora_A.weight"] = lora_a
        tensors[f"{prefix}{name}.lora_B.weight"] = lora_b
    for name, value in adapter.head.items():
        tensors[f"{PEFT_PREFIX}{name}"] = value.detach().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": _PEFT_TASK.get(cfg.task, "FEATURE_EXTRACTION"),
        "base_model_name_or_path": cfg.base.get("repo_id") or cfg.base.get("spec"),
        "r": rank,
        "lora_alpha": cfg.scaling * rank,  # keeps s = alpha / r whatever the padded rank
        "target_modules": sorted(cfg.modules),
        "modules_to_save": sorted({name.split(".")[0] for name in adapter.head}) or None,
        "fan_in_fan_out": model_type in _FAN_IN_FAN_OUT,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(_peft_card(adapter, config))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), **describe_peft_dir(out)}


def peft_factors(parts: dict, R: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) = (R A, B), zero-padded to `rank` rows / columns (B A is unchanged)."""
    lora_a = R.float() @ parts["A"].float()
    lora_b = parts["B"].float()
    r = lora_a.shape[0]
    if rank > r:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(rank - r, lora_a.shape[1])])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - r)], dim=1)
    return lora_a.contiguous(), lora_b.contiguous()


def _peft_card(adapter, config: dict) -> str:
    cfg = adapter.config
    return "\n".join(
        [
            "---",
            "library_name: peft",
            f"base_model: {config['base_model_name_or_path']}",
            "tags: [lora, loraxs-export]",
            "---",
            "",
            f"# PEFT LoRA exported from a LoRA-{cfg.method.upper()} adapter",
            "",
            f"- rank {config['r']} (LoRA-XS rank {cfg.rank}), lora_alpha {config['lora_alpha']:g}, "
            f"scaling {cfg.scaling:g}; lora_A = R A, lora_B = B (an exact export)",
            f"- source: {adapter.path}",
            "",
        ]
    )


def describe_peft_dir(path: str | Path) -> dict:
    """What a PEFT LoRA directory holds: rank, modules, parameters and bytes (for `inspect`)."""
    root = Path(path)
    config = _read_json(root / PEFT_CONFIG)
    tensors = _read_weights(root)
    lora = {k: v for k, v in tensors.items() if _LORA_KEY.match(k)}
    files = {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()}
    return {
        "format": "peft-lora",
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "rank": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "modules": len(lora) // 2,
        "params": sum(v.numel() for v in lora.values()),
        "head_params": sum(v.numel() for k, v in tensors.items() if k not in lora),
        "files": files,
        "bytes": sum(files.values()),
    }


# ----------------------------------------------------------------------------------------------
# Reading foreign checkpoints


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise BadInputError(f"{path.parent}: not a LoRA adapter directory (no {path.name})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BadInputError(f"{path}: unreadable ({error})".splitlines()[0]) from error
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object")
    return data


def _read_weights(root: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if (root / PEFT_WEIGHTS).is_file():
            return load_file(str(root / PEFT_WEIGHTS))
        if (root / PEFT_WEIGHTS_BIN).is_file():
            return torch.load(root / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise BadInputError(f"{root}: damaged adapter weights ({error})".splitlines()[0]) from error
    raise BadInputError(f"{root}: no {PEFT_WEIGHTS} or {PEFT_WEIGHTS_BIN}")


@dataclass
class ForeignAdapter:
    """A LoRA-style checkpoint split by module (backbone-relative names) plus its task head."""

    config: dict
    parts: dict[str, dict[str, torch.Tensor]]  # module -> {"A", "B"[, "R"]}
    head: dict[str, torch.Tensor]
    task: str | None


def read_foreign(src: str | Path, base, *, latent: bool) -> ForeignAdapter:
    """Read a PEFT (latent=False) or official LoRA-XS (latent=True) directory against `base`'s modules."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise BadInputError(f"{root}: no such adapter directory")
    config = _read_json(root / PEFT_CONFIG)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise BadInputError(f"{root}: a {config.get('peft_type')} adapter, not LoRA; only LoRA converts")
    if config.get("use_dora"):
        raise BadInputError(f"{root}: a DoRA adapter; its magnitude vector has no LoRA-XS equivalent")
    tensors = _read_weights(root)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        path = key.removeprefix(PEFT_PREFIX)
        lora, latent_match = _LORA_KEY.match(path), _LATENT_KEY.match(path)
        if lora:
            parts.setdefault(_module_name(lora["module"], base, root), {})[lora["part"]] = value.float()
        elif latent_match and latent:
            parts.setdefault(_module_name(latent_match["module"], base, root), {})["R"] = value.float()
        elif "lora_" in path:
            raise BadInputError(
                f"{root}: unsupported LoRA tensor {key} (embeddings and biases do not convert)"
            )
        else:  # a module saved whole (modules_to_save): the task head
            head[path.replace(".modules_to_save", "").replace(".default.", ".")] = value
    wanted = ("A", "B", "R") if latent else ("A", "B")
    incomplete = sorted(m for m, p in parts.items() if set(p) != set(wanted))
    if incomplete:
        raise BadInputError(f"{root}: {incomplete[0]} lacks one of {', '.join(wanted)}")
    if not parts:
        raise BadInputError(f"{root}: no lora_A / lora_B tensors")
    for name, p in parts.items():
        info = base.modules[name]
        ok = p["A"].shape[1] == info.in_features and p["B"].shape[0] == info.out_features
        if not ok or p["A"].shape[0] != p["B"].shape[1]:
            raise IncompatibleError(
                f"{root}: the LoRA of {name} has A {tuple(p['A'].shape)} and B {tuple(p['B'].shape)}, "
                f"which do not fit the base's ({info.out_features}, {info.in_features}) weight"
            )
    task = _LORAXS_TASK.get(str(config.get("task_type") or "").upper())
    if task is None and head:
        task = "seq-cls"
    return ForeignAdapter(config, parts, head, task)


def _module_name(path: str, base, root: Path) -> str:
    """The backbone-relative module whose name ends the checkpoint's module path (the longest match)."""
    matches = [n for n in base.modules if path == n or path.endswith("." + n)]
    if not matches:
        raise IncompatibleError(f"{root}: module {path} is not a linear layer of {base.resolved.spec}")
    return max(matches, key=len)


def _scaling(config: dict, module: str, r: int) -> float:
    """PEFT's scaling of one module: alpha / r (alpha / sqrt(r) with rsLoRA), per-module alpha patterns."""
    alpha = float(config.get("lora_alpha", r))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            alpha = float(value)
    return alpha / (r**0.5 if config.get("use_rslora") else r)


def _labels(base, head: dict, task: str | None) -> list[str] | None:
    if task != "seq-cls" or not head:
        return None
    rows = next(iter(v.shape[0] for k, v in head.items() if k.endswith("weight")), None)
    id2label = getattr(base.config, "id2label", None) or {}
    if rows and len(id2label) == rows:
        return [str(id2label[i]) for i in range(rows)]
    return [f"LABEL_{i}" for i in range(rows or 0)] or None


# ----------------------------------------------------------------------------------------------
# PEFT LoRA -> loraxs (projection)


def project(parts: dict, lora: dict, s_lora: float, s: float) -> tuple[torch.Tensor, float, float]:
    """R = (s_lora / s) B^+ (B_l A_l) A^+, with ||s B R A||^2 and ||s_lora B_l A_l||^2 (no m x n products)."""
    A, B = parts["A"].float(), parts["B"].float()
    a_l, b_l = lora["A"].float(), lora["B"].float()
    left = torch.linalg.pinv(B) @ b_l  # (r, k)
    right = a_l @ torch.linalg.pinv(A)  # (k, r)
    R = (s_lora / s) * (left @ right)
    kept = s * s * float(torch.trace((B.T @ B) @ R @ (A @ A.T) @ R.T))
    total = s_lora * s_lora * float(torch.trace((b_l.T @ b_l) @ (a_l @ a_l.T)))
    return R, kept, total


def import_peft(
    src: str | Path, model: str, out: str | Path, *, rank: int | None = None, force=False, on_module=None
) -> dict:
    """Project a PEFT LoRA onto the cached LoRA-XS factors of `model` (computed now on a miss)."""
    from .adapter import new_config, save_adapter
    from .initialize import FactorRequest, describe_base, ensure_factors, plan_factors

    out = _check_out(out, force)
    base = describe_base(model)
    foreign = read_foreign(src, base, latent=False)
    modules = sorted(foreign.parts)
    lora_rank = max(p["A"].shape[0] for p in foreign.parts.values())
    rank = rank or lora_rank
    plan = plan_factors(FactorRequest(model=model, rank=rank, targets=modules))
    entry, hit = ensure_factors(plan, on_module=on_module)
    factors = entry.load(rank, modules)
    s = 1.0  # alpha = rank: the projected R carries the LoRA's scale
    R, per_module = {}, {}
    kept_sum = total_sum = 0.0
    for name in modules:
        lora = foreign.parts[name]
        s_lora = _scaling(foreign.config, name, lora["A"].shape[0])
        R[name], kept, total = project(factors[name], lora, s_lora, s)
        per_module[name] = {"retained": kept / total if total > 0 else 1.0, "update_norm_sq": total}
        kept_sum, total_sum = kept_sum + kept, total_sum + total
    retained = kept_sum / total_sum if total_sum > 0 else 1.0
    labels = _labels(base, foreign.head, foreign.task)
    extra = {
        "converted_from": {
            "format": "peft-lora",
            "path": str(src),
            "lora_rank": lora_rank,
            "retained_energy": retained,
        },
    }
    config = new_config(
        base, entry, rank=rank, alpha=rank, modules=modules, task=foreign.task, labels=labels, extra=extra
    )
    save_adapter(out, config, R, head=foreign.head, overwrite=force)
    return {
        "out": str(out),
        "rank": rank,
        "lora_rank": lora_rank,
        "modules": len(modules),
        "params": rank * rank * len(modules),
        "factors": {"id": entry.id, "cache_hit": hit},
        "retained_energy": retained,
        "per_module": per_module,
        "head": sorted(foreign.head),
        "task": foreign.task,
    }


# ----------------------------------------------------------------------------------------------
# official LoRA-XS / LoRA-SB checkpoints -> loraxs (exact)


def import_official(src: str | Path, model: str, out: str | Path, *, force=False) -> dict:
    """Import lora_A / lora_B / *_lora_latent_mapping; A and B are embedded (they are authoritative)."""
    from .adapter import AdapterConfig, save_adapter
    from .initialize import describe_base

    out = _check_out(out, force)
    base = describe_base(model)
    foreign = read_foreign(src, base, latent=True)
    modules = sorted(foreign.parts)
    ranks = {p["A"].shape[0] for p in foreign.parts.values()}
    if len(ranks) != 1:
        raise BadInputError(f"{src}: modules have different ranks {sorted(ranks)}; loraxs needs one rank")
    rank = ranks.pop()
    scalings = {_scaling(foreign.config, m, rank) for m in modules}
    if len(scalings) != 1:
        raise BadInputError(f"{src}: modules have different scalings; loraxs needs one alpha")
    alpha = scalings.pop() * rank
    factors = {m: {"A": foreign.parts[m]["A"], "B": foreign.parts[m]["B"]} for m in modules}
    digest = hashlib.sha256()
    for m in modules:
        digest.update(m.encode())
        digest.update(factors[m]["A"].contiguous().numpy().tobytes())
        digest.update(factors[m]["B"].contiguous().numpy().tobytes())
    method = "sb" if _orthonormal_rows(factors) else "xs"
    config = AdapterConfig(
        method=method,
        rank=rank,
        alpha=alpha,
        modules=modules,
        base={
            "spec": model,
            "slug": base.slug,
            "fingerprint": base.fingerprint,
            "model_type": base.model_type,
            "repo_id": base.resolved.repo_id,
            "commit": base.resolved.commit,
        },
        factors={"id": "embedded", "sha256": digest.hexdigest(), "r_max": rank, "method": method},
        task=foreign.task,
        labels=_labels(base, foreign.head, foreign.task),
        extra={"converted_from": {"format": "official", "path": str(src), "lora_alpha": alpha}},
    )
    R = {m: foreign.parts[m]["R"] for m in modules}
    save_adapter(out, config, R, head=foreign.head, factors=factors, overwrite=force)
    return {
        "out": str(out),
        "method": method,
        "rank": rank,
        "alpha": alpha,
        "modules": len(modules),
        "params": rank * rank * len(modules),
        "head": sorted(foreign.head),
        "task": foreign.task,
    }


def _orthonormal_rows(factors: dict) -> bool:
    """LoRA-SB's A has orthonormal rows; LoRA-XS's A = S V^T does not."""
    a = next(iter(factors.values()))["A"]
    return bool(torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-3))


def _check_out(out: str | Path, force: bool) -> Path:
    path = Path(out).expanduser()
    if path.exists() and not force:
        raise BadInputError(f"{path} exists; pass --force to replace it")
    return path
