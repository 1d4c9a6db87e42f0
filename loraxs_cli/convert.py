"""Conversions between loraxs adapters, PEFT LoRA directories and official LoRA-XS/LoRA-SB checkpoints.

- Export (exact): lora_A = R A, lora_B = B, same scaling s = alpha / r; zero rows/columns pad the
  rank when asked without changing B A. adapter_config.json is written by peft.LoraConfig when peft is
  installed (its schema follows PEFT); a classifier's label map goes to label_map.json.
- Import a PEFT LoRA (a projection): for the cached XS factors, R = (s_lora / s) B^+ (B_l A_l) A^+
  (= B^T dW V_r S_r^-1 for B = U_r, A = S_r V_r^T); the share of ||dW||_F^2 kept is reported.
- Import an official checkpoint (exact): the official LoRA-XS and LoRA-SB code patches PEFT's LoRA
  Linear with an r x r `default_lora_latent_mapping` and saves with PEFT's save_pretrained. Its lora_A,
  lora_B and latent mapping are A, B and R; A and B are authoritative, so they are embedded in the
  adapter instead of taken from the cache.

Key forms read (after an optional `base_model.model.` prefix, which transformers' own PEFT integration
leaves out): `<module>.lora_A[.<adapter>].weight`, `<module>.lora_B[.<adapter>].weight` and, for the
latent mapping, `<module>_lora_latent_mapping.weight` (PEFT 0.10 to 0.17 remove ".default" anywhere in
a key) or `<module>.default_lora_latent_mapping.weight` (PEFT 0.18 and later remove only a trailing
adapter name). `<module>` is resolved against the base's linear layers (the longest suffix that is one).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.models.auto import modeling_auto

from .adapter import (
    AdapterConfig,
    adapter_factors,
    card_front_matter,
    hub_base,
    new_config,
    save_adapter,
)
from .errors import BadInputError, IncompatibleError, UsageError
from .fingerprint import base_record
from .fsutil import atomic_dir, check_output, loads_json
from .initialize import FactorRequest, describe_base, ensure_factors, plan_factors
from .methods import METHOD_NAMES, SB, XS
from .paths import factors_root
from .sources import load_one, spec_path

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
LABEL_MAP = "label_map.json"  # id2label / label2id of an exported classifier (PEFT's config has no place)
RECONSTR_CONFIG = "reconstr_config.json"  # the official code's settings, beside or above the adapter
_PEFT_TASK = {
    "causal-lm": "CAUSAL_LM",
    "preference": "CAUSAL_LM",  # a DPO-tuned language model
    "seq-cls": "SEQ_CLS",
    "regression": "SEQ_CLS",
    None: "FEATURE_EXTRACTION",
}
_LORAXS_TASK = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}
# GPT-2 style models store (in, out) weights: PEFT calls that fan_in_fan_out.
_FAN_IN_FAN_OUT = {"gpt2"}

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[\w-]+)?\.weight$")
# "<module>_lora_latent_mapping" (PEFT <= 0.17), "<module>.default_lora_latent_mapping" (PEFT >= 0.18)
_LATENT_KEY = re.compile(r"^(?P<stem>.+)lora_latent_mapping\.weight$")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[\w-]+\.")
# |A A^T - I| and |B^T B - I| of orthonormal factors rounded to bf16 stay below 2 * 2^-8 (Cauchy-Schwarz
# on the rounding errors); LoRA-XS's A A^T = diag(S^2) is that close to I only if every S_i is about 1.
ORTHONORMAL_TOL = 0.02
METHODS = ("auto", *METHOD_NAMES)


def head_prefix(model_type: str, task: str | None) -> str:
    """Where the backbone sits inside the model PEFT wraps: 'model.' in LlamaForCausalLM, '' in LlamaModel."""
    if task is None:
        return ""
    names = (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if task in ("causal-lm", "preference")
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
    """Write a PEFT LoRA directory that PEFT loads as is, with the adapter's exact update.

    Servers that refuse `modules_to_save` (vLLM) load it too when it has no task head. The adapter is
    any single-adapter spec (sources.load_one: a directory or a pack member).
    """
    adapter = load_one(adapter_dir)
    cfg = adapter.config
    out = _check_out(out, force, adapter_dir)
    rank = pad_rank or cfg.rank
    if rank < cfg.rank:
        raise UsageError(f"--pad-rank {pad_rank} is below the adapter's rank {cfg.rank}")
    factors = adapter_factors(adapter)
    limit = min(min(factors[m]["B"].shape[0], factors[m]["A"].shape[1]) for m in cfg.modules)
    if rank > limit:  # a LoRA's rank is at most min(m, n) of each weight (and 1e9 would not fit in memory)
        raise UsageError(f"--pad-rank {pad_rank} is above {limit}, the smallest side of an adapted weight")
    model_type = cfg.base.get("model_type") or ""
    prefix = PEFT_PREFIX + head_prefix(model_type, cfg.task)
    tensors: dict[str, torch.Tensor] = {}
    for name in cfg.modules:
        lora_a, lora_b = peft_factors(factors[name], adapter.R[name], rank)
        tensors[f"{prefix}{name}.lora_A.weight"] = lora_a
        tensors[f"{prefix}{name}.lora_B.weight"] = lora_b
    for name, value in adapter.head.items():
        tensors[f"{PEFT_PREFIX}{name}"] = value.detach().contiguous()
    alpha = cfg.scaling * rank  # keeps s = alpha / r whatever the padded rank
    fields = {
        "task_type": _PEFT_TASK.get(cfg.task, "FEATURE_EXTRACTION"),
        "base_model_name_or_path": (hub_base(cfg.base) or [cfg.base.get("spec")])[0],
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": sorted(cfg.modules),
        "modules_to_save": sorted({name.split(".")[0] for name in adapter.head}) or None,
        "fan_in_fan_out": model_type in _FAN_IN_FAN_OUT,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }
    label_map = None
    if cfg.task == "seq-cls" and cfg.labels:
        label_map = {
            "id2label": {str(i): name for i, name in enumerate(cfg.labels)},
            "label2id": {name: i for i, name in enumerate(cfg.labels)},
        }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        written_by = write_peft_config(tmp, fields)
        if label_map is not None:
            (tmp / LABEL_MAP).write_text(json.dumps(label_map, indent=2) + "\n")
        (tmp / "README.md").write_text(_peft_card(adapter, fields, label_map is not None))
    return {
        "out": str(out),
        **describe_peft_dir(out),
        "modules_to_save": fields["modules_to_save"] or [],
        "labels": list(cfg.labels) if label_map else None,
        "config_written_by": written_by,
    }


def write_peft_config(directory: Path, fields: dict) -> str:
    """adapter_config.json through peft.LoraConfig(...).save_pretrained when peft is installed, so the
    schema is PEFT's own; otherwise the same fields with PEFT's names and defaults. Returns which."""
    try:  # peft is optional (not a dependency): imported only here, where it writes the config
        import peft
        from peft import LoraConfig
    except ImportError:
        config = {
            "peft_type": "LORA",
            **fields,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return "loraxs"
    LoraConfig(**fields).save_pretrained(str(directory))
    return f"peft {peft.__version__}"


def peft_factors(parts: dict, R: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) = (R A, B), zero-padded to `rank` rows / columns (B A is unchanged)."""
    lora_a = R.float() @ parts["A"].float()
    lora_b = parts["B"].float()
    r = lora_a.shape[0]
    if rank > r:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(rank - r, lora_a.shape[1])])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - r)], dim=1)
    return lora_a.contiguous(), lora_b.contiguous()


def _peft_card(adapter, config: dict, labels: bool) -> str:
    cfg = adapter.config
    lines = [
        *card_front_matter(cfg.base, ("lora", "loraxs-export"), "peft"),  # never a local path
        f"# PEFT LoRA exported from a LoRA-{cfg.method.upper()} adapter",
        "",
        f"- rank {config['r']} (LoRA-XS rank {cfg.rank}), lora_alpha {config['lora_alpha']:g}, "
        f"scaling {cfg.scaling:g}; lora_A = R A, lora_B = B (an exact export)",
        f"- source: {adapter.path}",
    ]
    if config["modules_to_save"]:
        lines.append(
            f"- trained task head under modules_to_save ({', '.join(config['modules_to_save'])}): "
            "PEFT loads it; vLLM refuses adapters with modules_to_save (its newest releases take only "
            "classifier/score, on classification models)"
        )
    if labels:
        lines += [
            "",
            f"The label map is in `{LABEL_MAP}`; give it to the base model so that predictions carry names:",
            "",
            "```python",
            "import json",
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification",
            "",
            f'labels = json.load(open("ADAPTER_DIR/{LABEL_MAP}"))',
            'id2label = {int(i): name for i, name in labels["id2label"].items()}  # JSON keys are text',
            "model = AutoModelForSequenceClassification.from_pretrained(",
            '    BASE, id2label=id2label, label2id=labels["label2id"]',
            ")",
            'model = PeftModel.from_pretrained(model, "ADAPTER_DIR")',
            "```",
        ]
    return "\n".join([*lines, ""])


def describe_peft_dir(path: str | Path) -> dict:
    """What a PEFT LoRA directory holds: rank, modules, parameters and bytes (for `inspect`).

    An official LoRA-XS/LoRA-SB checkpoint is one too; its r x r latent mappings count as adapter
    parameters, not as task head."""
    root = Path(path)
    config = _read_json(root / PEFT_CONFIG)
    tensors = _read_weights(root)
    lora = {k: v for k, v in tensors.items() if _LORA_KEY.match(k)}
    latent = {k: v for k, v in tensors.items() if _LATENT_KEY.match(k)}
    files = {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()}
    return {
        "format": "official" if latent else "peft-lora",
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "rank": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "modules": len(lora) // 2,
        "params": sum(v.numel() for v in (*lora.values(), *latent.values())),
        "head_params": sum(v.numel() for k, v in tensors.items() if k not in lora and k not in latent),
        "files": files,
        "bytes": sum(files.values()),
    }


# ----------------------------------------------------------------------------------------------
# Reading foreign checkpoints


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise BadInputError(f"{path.parent}: not a LoRA adapter directory (no {path.name})")
    try:
        data = loads_json(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BadInputError(f"{path}: unreadable ({error})".splitlines()[0]) from error
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object")
    return data


def _read_weights(root: Path) -> dict[str, torch.Tensor]:
    try:
        if (root / PEFT_WEIGHTS).is_file():
            return load_file(str(root / PEFT_WEIGHTS))
        if (root / PEFT_WEIGHTS_BIN).is_file():
            return torch.load(root / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only=True refused it: more than tensors, maybe code to run
        raise BadInputError(
            f"{root / PEFT_WEIGHTS_BIN}: a pickle holding more than plain tensors (it could run code); "
            f"not loaded; save the adapter as {PEFT_WEIGHTS}"
        ) from None
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as error:
        raise BadInputError(f"{root}: damaged adapter weights ({error})".splitlines()[0]) from error
    raise BadInputError(f"{root}: no {PEFT_WEIGHTS} or {PEFT_WEIGHTS_BIN}")


@dataclass
class ForeignAdapter:
    """A LoRA-style checkpoint split by module (backbone-relative names) plus its task head."""

    config: dict
    parts: dict[str, dict[str, torch.Tensor]]  # module -> {"A", "B"[, "R"]}
    head: dict[str, torch.Tensor]
    task: str | None
    labels: list[str] | None = None


def read_foreign(src: str | Path, base, *, latent: bool) -> ForeignAdapter:
    """Read a PEFT (latent=False) or official LoRA-XS/LoRA-SB (latent=True) directory against `base`."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise BadInputError(f"{root}: no such adapter directory")
    config = _read_json(root / PEFT_CONFIG)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise BadInputError(f"{root}: a {config.get('peft_type')} adapter, not LoRA; only LoRA converts")
    if config.get("use_dora"):
        raise BadInputError(f"{root}: a DoRA adapter; its magnitude vector has no LoRA-XS equivalent")
    tensors = _read_weights(root)
    by_path: dict[str, dict[str, torch.Tensor]] = {}  # the checkpoint's module path -> parts
    latents: dict[str, tuple[str, torch.Tensor]] = {}  # key -> (stem, latent mapping)
    head: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        path = key.removeprefix(PEFT_PREFIX)
        lora, latent_match = _LORA_KEY.match(path), _LATENT_KEY.match(path)
        if lora:
            by_path.setdefault(lora["module"], {})[lora["part"]] = value.float()
        elif latent_match:
            if not latent:
                raise BadInputError(
                    f"{root}: {key} is an r x r latent mapping: an official LoRA-XS/LoRA-SB "
                    "checkpoint; import it exactly with --from official"
                )
            latents[key] = (latent_match["stem"], value)
        elif "lora_" in path:
            raise BadInputError(
                f"{root}: unsupported LoRA tensor {key} (embeddings and biases do not convert)"
            )
        elif ".original_module." not in path:  # a module saved whole (modules_to_save): the task head
            head[_MODULES_TO_SAVE.sub(".", path)] = value
    for key, (stem, value) in latents.items():
        owner = next((c for c in _latent_owners(stem) if c in by_path), None)
        if owner is None:
            raise BadInputError(f"{root}: the latent mapping {key} has no lora_A / lora_B beside it")
        if "R" in by_path[owner]:
            raise BadInputError(f"{root}: two latent mappings for {owner}")
        by_path[owner]["R"] = value.float()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for path, found in by_path.items():
        name = _module_name(path, base, root)
        if name in parts:
            raise BadInputError(f"{root}: two LoRAs for the module {name}")
        parts[name] = found
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
        r = p["A"].shape[0]
        if "R" in p and tuple(p["R"].shape) != (r, r):
            raise BadInputError(
                f"{root}: the latent mapping of {name} is {tuple(p['R'].shape)}, not {r} x {r}"
            )
    task = _LORAXS_TASK.get(str(config.get("task_type") or "").upper())
    if task is None and head:
        task = "seq-cls"
    labels = None
    if task == "seq-cls":
        rows = head_rows(base, head)
        if rows == 1:
            task = "regression"  # one output: a regression head (GLUE's STS-B)
        elif rows:
            labels = _label_names(root, base, rows)
    return ForeignAdapter(config, parts, head, task, labels)


def _latent_owners(stem: str) -> list[str]:
    """Module paths a latent-mapping key can belong to: "<m>_" (PEFT <= 0.17, ".default" removed),
    "<m>.default_" (PEFT >= 0.18, any adapter name) or "<m>."; the caller keeps one with lora_A/B."""
    if stem.endswith("."):
        return [stem[:-1]]
    if not stem.endswith("_"):
        return []
    path = stem[:-1]
    return [path, path.rpartition(".")[0]] if "." in path else [path]


def _module_name(path: str, base, root: Path) -> str:
    """The base's linear layer (backbone-relative) that the checkpoint's module path names: the path
    itself or its longest suffix that is one (`model.layers.0.mlp.down_proj` -> `layers.0.mlp.down_proj`)."""
    parts = path.split(".")
    for i in range(len(parts)):
        candidate = ".".join(parts[i:])
        if candidate in base.modules:
            return candidate
    raise IncompatibleError(f"{root}: module {path} is not a linear layer of {base.resolved.spec}")


def _scaling(config: dict, module: str, r: int) -> float:
    """PEFT's scaling of one module: alpha / r (alpha / sqrt(r) with rsLoRA), per-module alpha patterns."""
    alpha = float(config.get("lora_alpha", r))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            alpha = float(value)
    return alpha / (r**0.5 if config.get("use_rslora") else r)


def head_rows(base, head: dict[str, torch.Tensor]) -> int | None:
    """Outputs of a task head: the rows of its output projection, the last linear layer of the head
    in the classifier's module order (RoBERTa: classifier.out_proj after classifier.dense; Llama: score)."""
    weights = {k: v for k, v in head.items() if k.endswith(".weight") and v.dim() == 2}
    if not weights:
        return None
    for name in reversed(_classifier_linears(base.config)):
        if f"{name}.weight" in weights:
            return int(weights[f"{name}.weight"].shape[0])
    return int(min(v.shape[0] for v in weights.values()))  # no classifier class: the narrowest


def _classifier_linears(config) -> list[str]:
    """Linear layers of the model's sequence-classification class, in module order (meta device)."""
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _label_names(root: Path, base, rows: int) -> list[str]:
    """Names of `rows` classes: a label map beside the checkpoint (what `--to peft-lora` writes), the
    base's own named labels, else LABEL_i (the official checkpoints carry none)."""
    path = root / LABEL_MAP
    if path.is_file():
        id2label = _read_json(path).get("id2label") or {}
        names = [id2label.get(str(i)) for i in range(rows)]
        if len(id2label) == rows and all(isinstance(n, str) for n in names):
            return names
        raise BadInputError(f"{path}: its id2label does not name the head's {rows} classes")
    id2label = getattr(base.config, "id2label", None) or {}
    names = [str(id2label.get(i, "")) for i in range(rows)]
    if len(id2label) == rows and any(n != f"LABEL_{i}" for i, n in enumerate(names)):
        return names
    return [f"LABEL_{i}" for i in range(rows)]


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
    out = _check_out(out, force, src)
    base = describe_base(model)
    _check_out(out, True, base.resolved.path, what="the base model")
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
    labels = foreign.labels
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
    save_adapter(out, config, R, head=foreign.head, force=force)
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
        "labels": labels,
    }


# ----------------------------------------------------------------------------------------------
# official LoRA-XS / LoRA-SB checkpoints -> loraxs (exact)


def import_official(
    src: str | Path, model: str, out: str | Path, *, method: str = "auto", force=False
) -> dict:
    """Import an official LoRA-XS / LoRA-SB checkpoint exactly: lora_A, lora_B and the latent mapping
    are A, B and R (embedded: they are authoritative), scaling lora_alpha / r as PEFT computes it.

    `method` "auto" tells LoRA-SB (A and B both orthonormal) from LoRA-XS (A = S V^T) by the factors.
    """
    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}: use {', '.join(METHODS)}")
    out = _check_out(out, force, src)
    base = describe_base(model)
    _check_out(out, True, base.resolved.path, what="the base model")
    reconstr = _reconstr_config(Path(src).expanduser())
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
    detected = detect_method(factors)
    chosen = detected if method == "auto" else method
    source = {"format": "official", "path": str(src), "lora_alpha": alpha, "method_detected": detected}
    if reconstr is not None:
        source["reconstr_config"] = reconstr
    config = AdapterConfig(
        method=chosen,
        rank=rank,
        alpha=alpha,
        modules=modules,
        base=base_record(base),
        factors={"id": "embedded", "sha256": digest.hexdigest(), "r_max": rank, "method": chosen},
        task=foreign.task,
        labels=foreign.labels,
        extra={"converted_from": source},
    )
    R = {m: foreign.parts[m]["R"] for m in modules}
    save_adapter(out, config, R, head=foreign.head, factors=factors, force=force)
    return {
        "out": str(out),
        "method": chosen,
        "method_detected": detected,
        "rank": rank,
        "alpha": alpha,
        "modules": len(modules),
        "params": rank * rank * len(modules),
        "head": sorted(foreign.head),
        "task": foreign.task,
        "labels": foreign.labels,
    }


def detect_method(factors: dict[str, dict[str, torch.Tensor]]) -> str:
    """LoRA-SB ("sb") when every module's A has orthonormal rows and B orthonormal columns, to 16-bit
    rounding (the singular vectors of the first step, left in bf16 by the official code); else LoRA-XS
    ("xs": A = S V^T, whose rows have the singular values as norms)."""
    for parts in factors.values():
        a, b = parts["A"].double(), parts["B"].double()
        eye = torch.eye(a.shape[0], dtype=torch.float64)
        if float((a @ a.T - eye).abs().max()) > ORTHONORMAL_TOL:
            return XS.name
        if float((b.T @ b - eye).abs().max()) > ORTHONORMAL_TOL:
            return XS.name
    return SB.name


def _reconstr_config(root: Path) -> dict | None:
    """The official code's reconstr_config.json, beside the adapter (GLUE runs) or in the run
    directory above it (`<run>/ft`, `<run>/final_model`); a run without the r x r matrix is refused."""
    for path in (root / RECONSTR_CONFIG, root.parent / RECONSTR_CONFIG):
        if path.is_file():
            config = _read_json(path)
            if config.get("r_squared") is False:
                raise BadInputError(
                    f"{path}: r_squared is false, so the run trained lora_A without an r x r matrix: "
                    "a plain LoRA; import it with --from peft-lora"
                )
            return config
    return None


def _check_out(out: str | Path, force: bool, source: str | Path, what: str = "the source adapter") -> Path:
    """The --out of a conversion: refused when it overlaps what it reads (`source`, the factor
    cache), then when it exists without --force (fsutil.check_output)."""
    return check_output(out, {what: spec_path(source), "the factor cache": factors_root()}, force=force)
