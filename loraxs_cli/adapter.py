"""The adapter directory format (DESIGN.md section 2).

    ADAPTER_DIR/
        loraxs_config.json     method, rank, alpha, targets, base + factor ids, task, labels, version
        adapter.safetensors    "<module>.R" (r, r) float32 per target; "head.<param>" for a task head
        factors.safetensors    only with --embed-factors: "<module>.A", "<module>.B" [, "<module>.S"]
        README.md              model card

The config is deliberately NOT called adapter_config.json: PEFT and vLLM would load the directory
as a plain LoRA and silently ignore R. Export to PEFT is `loraxs convert --to peft-lora`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import BadInputError, IncompatibleError

CONFIG_FILE = "loraxs_config.json"
WEIGHTS_FILE = "adapter.safetensors"
EMBEDDED_FACTORS_FILE = "factors.safetensors"
CARD_FILE = "README.md"
FORMAT_VERSION = 1
HEAD_PREFIX = "head."


@dataclass
class AdapterConfig:
    method: str  # "xs" or "sb"
    rank: int
    alpha: float
    modules: list[str]  # backbone-relative target names
    base: dict  # spec, slug, fingerprint, model_type, repo_id, commit
    factors: dict  # id, sha256, r_max, method
    task: str | None = None  # "causal-lm", "seq-cls", "regression" or None
    labels: list[str] | None = None
    head: list[str] = field(default_factory=list)  # names of trained head parameters
    extra: dict = field(default_factory=dict)  # training data, metrics, ...
    # weights file name -> sha256 of its tensors (names, dtypes, shapes, bytes), checked on load; it
    # survives re-serialisation (pack/unpack), unlike a hash of the file's bytes
    tensors_sha256: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    loraxs_version: str = __version__
    created: str = ""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def from_dict(cls, data: dict, source: str) -> AdapterConfig:
        if not isinstance(data, dict):
            raise BadInputError(f"{source}: not a loraxs adapter config (expected a JSON object)")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BadInputError(f"{source}: unsupported adapter format version {version!r}; upgrade loraxs")
        known = set(cls.__dataclass_fields__)
        try:
            config = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as error:
            raise BadInputError(f"{source}: malformed adapter config ({error})") from error
        if not isinstance(config.rank, int) or config.rank <= 0 or not isinstance(config.modules, list):
            raise BadInputError(f"{source}: malformed adapter config (rank or modules)")
        if not all(isinstance(m, str) for m in config.modules):
            raise BadInputError(f"{source}: malformed adapter config (module names must be strings)")
        if not isinstance(config.base, dict) or not isinstance(config.factors, dict):
            raise BadInputError(f"{source}: malformed adapter config (base or factors)")
        if not isinstance(config.tensors_sha256, dict):
            raise BadInputError(f"{source}: malformed adapter config (tensors_sha256)")
        return config


@dataclass
class Adapter:
    path: Path | None
    config: AdapterConfig
    R: dict[str, torch.Tensor]  # module -> (r, r) float32
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> tensor
    factors: dict[str, dict[str, torch.Tensor]] | None = None  # embedded factors, if any

    @property
    def num_params(self) -> int:
        return sum(r.numel() for r in self.R.values())

    @property
    def head_params(self) -> int:
        return sum(t.numel() for t in self.head.values())


def new_config(
    base,
    entry,
    *,
    rank: int,
    alpha: float | None = None,
    modules: list[str] | None = None,
    task: str | None = None,
    labels: list[str] | None = None,
    extra: dict | None = None,
) -> AdapterConfig:
    """The config of an adapter trained on `entry` (a cache FactorEntry) of `base` (initialize.BaseInfo).

    LoRA-SB factors carry their own scale in R0 = diag(S), so their scaling is 1 (alpha = r).
    """
    method = entry.meta.get("method", "xs")
    return AdapterConfig(
        method=method,
        rank=rank,
        alpha=float(rank if alpha is None or method == "sb" else alpha),
        modules=sorted(modules or entry.modules),
        base={
            "spec": base.resolved.spec,
            "slug": base.slug,
            "fingerprint": base.fingerprint,
            "model_type": base.model_type,
            "repo_id": base.resolved.repo_id,
            "commit": base.resolved.commit,
        },
        factors={"id": entry.id, "sha256": entry.sha256, "r_max": entry.r_max, "method": method},
        task=task,
        labels=labels,
        extra=dict(extra or {}),
    )


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_adapter(
    out_dir: str | Path,
    config: AdapterConfig,
    R: dict[str, torch.Tensor],
    *,
    head: dict[str, torch.Tensor] | None = None,
    factors: dict[str, dict[str, torch.Tensor]] | None = None,
    card: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write an adapter directory atomically (temp sibling, then rename into place)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise BadInputError(f"{out} exists; pass --force to replace it")
    config.created = config.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    config.head = sorted(head or {})
    missing = sorted(set(config.modules) - set(R))
    if missing:
        raise ValueError(f"no R for {missing[:3]}")
    tensors = {f"{name}.R": R[name].detach().float().cpu().contiguous() for name in config.modules}
    tensors.update({HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in (head or {}).items()})
    flat = _flat_factors(factors)
    config.tensors_sha256 = {WEIGHTS_FILE: tensors_sha256(tensors)}
    if flat is not None:
        config.tensors_sha256[EMBEDDED_FACTORS_FILE] = tensors_sha256(flat)
    metadata = {"format": "loraxs", "method": config.method, "rank": str(config.rank)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        if flat is not None:
            save_file(flat, str(tmp / EMBEDDED_FACTORS_FILE), metadata={"format": "loraxs-factors"})
        (tmp / CONFIG_FILE).write_text(config.to_json())
        (tmp / CARD_FILE).write_text(card or default_card(config))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; an existing target is moved aside first and removed only afterwards."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:6]}"
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def load_adapter(path: str | Path) -> Adapter:
    """Read and validate an adapter directory, or a pack member `PACK.safetensors::NAME` (pack.py);
    every problem is a one-line BadInputError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .pack import load_member, split_member

    member = split_member(path)
    if member is not None:
        return load_member(*member)
    root = Path(path)
    if not root.is_dir():
        raise BadInputError(f"{root}: no such adapter directory")
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        hint = (
            " (a PEFT adapter: import it with `loraxs convert --from peft-lora`)"
            if (root / "adapter_config.json").is_file()
            else ""
        )
        raise BadInputError(f"{root}: not a loraxs adapter (no {CONFIG_FILE}){hint}")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BadInputError(f"{config_path}: unreadable adapter config ({error})") from error
    config = AdapterConfig.from_dict(data, str(config_path))
    try:
        tensors = load_file(str(root / WEIGHTS_FILE))
        factors_file = root / EMBEDDED_FACTORS_FILE
        flat_factors = load_file(str(factors_file)) if factors_file.is_file() else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BadInputError(f"{root}: damaged adapter weights ({error})".splitlines()[0]) from error
    _check_tensors(root, config, WEIGHTS_FILE, tensors)
    if flat_factors is not None:
        _check_tensors(root, config, EMBEDDED_FACTORS_FILE, flat_factors)
    elif EMBEDDED_FACTORS_FILE in config.tensors_sha256:
        raise BadInputError(f"{root}: {EMBEDDED_FACTORS_FILE} is missing; restore or retrain the adapter")
    embedded = _group_factors(flat_factors) if flat_factors is not None else None
    R = {name: tensors.get(f"{name}.R") for name in config.modules}
    bad = [name for name, r in R.items() if r is None or tuple(r.shape) != (config.rank, config.rank)]
    if bad:
        raise BadInputError(f"{root}: {WEIGHTS_FILE} lacks a {config.rank}x{config.rank} R for {bad[0]}")
    head = {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    if embedded is not None and set(config.modules) - set(embedded):
        raise BadInputError(f"{root}: {EMBEDDED_FACTORS_FILE} does not cover every target module")
    return Adapter(root, config, {k: v.float() for k, v in R.items()}, head, embedded)


def _flat_factors(factors: dict[str, dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor] | None:
    if factors is None:
        return None
    return {
        f"{m}.{k}": v.detach().float().cpu().contiguous()
        for m, parts in factors.items()
        for k, v in parts.items()
    }


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    from .pack import tensors_sha256 as digest

    return digest(tensors)


def _check_tensors(root: Path, config: AdapterConfig, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """An altered weights file fails the sha256 its config recorded (older adapters record none)."""
    expected = config.tensors_sha256.get(name)
    if expected is None:
        return
    actual = tensors_sha256(tensors)
    if actual != expected:
        raise BadInputError(
            f"{root}: damaged adapter weights ({name} sha256 {actual[:12]} != recorded "
            f"{str(expected)[:12]}: altered or corrupted); restore or retrain the adapter"
        )


def _group_factors(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        module, _, part = key.rpartition(".")
        grouped.setdefault(module, {})[part] = value
    return grouped


def check_base(adapter: Adapter, fingerprint: str, spec: str) -> None:
    """Refuse to apply an adapter to another base than it was trained on (exit code 4)."""
    expected = adapter.config.base.get("fingerprint")
    if expected != fingerprint:
        raise IncompatibleError(
            f"adapter {adapter.path} was trained on base {adapter.config.base.get('spec')!r} "
            f"(fingerprint {expected}), not on {spec!r} (fingerprint {fingerprint})"
        )


def adapter_factors(adapter: Adapter, cache=None) -> dict[str, dict[str, torch.Tensor]]:
    """The frozen factors this adapter was trained on, sliced to its rank; refuses any other set."""
    from .cache import FactorCache

    rank, wanted = adapter.config.rank, adapter.config.factors
    if adapter.factors is not None:
        return {
            m: {k: v[:rank] if k in ("A", "S") else v[:, :rank] for k, v in adapter.factors[m].items()}
            for m in adapter.config.modules
        }
    cache = cache or FactorCache()
    entry = cache.get(wanted.get("id", ""))
    if entry is None:
        raise IncompatibleError(
            f"the factors of adapter {adapter.path} ({wanted.get('id')}) are not in the factor cache "
            f"{cache.root}: run `loraxs init {adapter.config.base.get('spec')} --rank {wanted.get('r_max')}` "
            "with the same recipe, or use an adapter saved with --embed-factors"
        )
    if entry.sha256 != wanted.get("sha256"):
        raise IncompatibleError(
            f"adapter {adapter.path} was trained on factor set {wanted.get('id')} with sha256 "
            f"{str(wanted.get('sha256'))[:12]}, but the cache holds {entry.sha256[:12]} under that id"
        )
    return entry.load(rank, adapter.config.modules)


def default_card(config: AdapterConfig) -> str:
    base = config.base.get("repo_id") or config.base.get("spec")
    params = config.rank * config.rank * len(config.modules)
    metrics = config.extra.get("metrics") or {}
    lines = [
        "---",
        "library_name: loraxs",
        f"base_model: {base}",
        "tags: [loraxs, lora-xs" + (", lora-sb" if config.method == "sb" else "") + "]",
        "---",
        "",
        f"# LoRA-{config.method.upper()} adapter for {base}",
        "",
        f"- method: LoRA-{config.method.upper()}, rank {config.rank}, alpha {config.alpha:g} "
        f"(scaling {config.scaling:g})",
        f"- trainable numbers: {params:,} ({len(config.modules)} modules x {config.rank}x{config.rank})",
        f"- task: {config.task or 'none'}"
        + (f", labels: {', '.join(config.labels)}" if config.labels else ""),
        f"- base fingerprint: {config.base.get('fingerprint')}",
        f"- factor set: {config.factors.get('id')} (sha256 {str(config.factors.get('sha256'))[:12]})",
    ]
    if config.extra.get("data"):
        lines.append(f"- training data: {config.extra['data']}")
    if metrics:
        lines += ["", "## Metrics", "", *[f"- {k}: {v}" for k, v in metrics.items()]]
    lines += [
        "",
        "This directory is not a PEFT LoRA: load it with `loraxs`, or export it with",
        "`loraxs convert ADAPTER --to peft-lora --out DIR`.",
        "",
    ]
    return "\n".join(lines)


def apply_adapter(model: torch.nn.Module, adapter: Adapter, cache=None) -> dict:
    """Inject the adapter into `model` (its backbone) with its own factors, R and task head.

    The caller checks the base first (`check_base`). Returns name -> XSLinear.
    """
    from .layer import inject
    from .models import backbone

    factors = adapter_factors(adapter, cache)
    layers = inject(
        backbone(model),
        {name: (parts["A"], parts["B"]) for name, parts in factors.items()},
        adapter.config.scaling,
        R=adapter.R,
    )
    if adapter.head:
        own = dict(model.named_parameters())
        unknown = sorted(set(adapter.head) - set(own))
        if unknown:
            raise IncompatibleError(f"adapter head parameter {unknown[0]} does not exist in this model")
        with torch.no_grad():
            for name, value in adapter.head.items():
                if own[name].shape != value.shape:
                    raise IncompatibleError(
                        f"adapter head {name} has shape {tuple(value.shape)}, "
                        f"the model {tuple(own[name].shape)}"
                    )
                own[name].copy_(value)
    return layers
