"""The adapter directory format (README "Conventions and choices").

    ADAPTER_DIR/
        loraxs_config.json     method, rank, alpha, targets, base + factor ids, task, labels, version
        adapter.safetensors    "<module>.R" (r, r) float32 per target; "head.<param>" for a task head
        factors.safetensors    only with --embed-factors: "<module>.A", "<module>.B" [, "<module>.S"]
        README.md              model card

The config is deliberately NOT called adapter_config.json: PEFT and vLLM would load the directory
as a plain LoRA and silently ignore R. Export to PEFT is `loraxs convert --to peft-lora`.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .cache import FactorCache
from .errors import BadInputError, DivergedError, IncompatibleError, MissingFactorsError
from .fingerprint import base_record
from .fsutil import atomic_dir, loads_json, require_absent, require_regular_file
from .layer import inject
from .methods import method_of
from .models import backbone, cached_snapshot_repo
from .paths import loraxs_home

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
    origin: str | None = None  # the Hub id it was read from (ORG/NAME[@REV]), path being its snapshot

    @property
    def label(self) -> str:
        """How messages name it: its Hub id, else its path."""
        return self.origin or str(self.path)

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
        alpha=method_of(method).adapter_alpha(rank, alpha),
        modules=sorted(modules or entry.modules),
        base=base_record(base),
        factors={
            "id": entry.id,
            "sha256": entry.sha256,
            "r_max": entry.r_max,
            "method": method,
            # how to recompute the entry if it leaves the cache (`recompute_command`)
            "recipe": {k: v for k, v in (entry.meta.get("recipe") or {}).items() if k != "modules"},
            "targets": targets_spec(entry.modules, getattr(base, "modules", None)),
        },
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
    force: bool = True,
) -> Path:
    """Write an adapter directory atomically (fsutil.atomic_dir: temp sibling, fsync, rename)."""
    out = require_absent(out_dir, force=force)
    config.created = config.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    config.head = sorted(head or {})
    missing = sorted(set(config.modules) - set(R))
    if missing:
        raise ValueError(f"no R for {missing[:3]}")
    tensors = {f"{name}.R": R[name].detach().float().cpu().contiguous() for name in config.modules}
    tensors.update({HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in (head or {}).items()})
    _refuse_non_finite(out, tensors, trained="training" in config.extra)
    flat = flat_factors(factors)
    config.tensors_sha256 = {WEIGHTS_FILE: tensors_sha256(tensors)}
    if flat is not None:
        config.tensors_sha256[EMBEDDED_FACTORS_FILE] = tensors_sha256(flat)
    metadata = {"format": "loraxs", "method": config.method, "rank": str(config.rank)}
    with atomic_dir(out, replace=force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        if flat is not None:
            save_file(flat, str(tmp / EMBEDDED_FACTORS_FILE), metadata={"format": "loraxs-factors"})
        (tmp / CONFIG_FILE).write_text(config.to_json())
        head_params = sum(t.numel() for t in (head or {}).values())
        (tmp / CARD_FILE).write_text(card or default_card(config, head_params=head_params))
    return out


def _refuse_non_finite(out: Path, tensors: dict[str, torch.Tensor], *, trained: bool) -> None:
    """An adapter holding a NaN or an infinity is never written: from training it diverged (exit 5),
    from any other source (an import) its input was bad (exit 3)."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            what = f"{key} holds NaN or infinite values; {out} is not written"
            if trained:
                raise DivergedError(f"training diverged: {what} (lower --lr)")
            raise BadInputError(what)


def load_adapter(path: str | Path) -> Adapter:
    """Read and validate an adapter directory; every problem is a one-line BadInputError. (Every
    other way to name an adapter, `PACK::NAME` included, is sources.load_one.)"""
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
        data = loads_json(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BadInputError(f"{config_path}: unreadable adapter config ({error})") from error
    config = AdapterConfig.from_dict(data, str(config_path))
    try:
        tensors = load_file(str(require_regular_file(root / WEIGHTS_FILE, "adapter weights file")))
        factors_file = root / EMBEDDED_FACTORS_FILE
        stored_factors = (
            load_file(str(require_regular_file(factors_file, "factors file")))
            if factors_file.exists()
            else None
        )
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BadInputError(f"{root}: damaged adapter weights ({error})".splitlines()[0]) from error
    _check_tensors(root, config, WEIGHTS_FILE, tensors)
    if stored_factors is not None:
        _check_tensors(root, config, EMBEDDED_FACTORS_FILE, stored_factors)
    elif EMBEDDED_FACTORS_FILE in config.tensors_sha256:
        raise BadInputError(f"{root}: {EMBEDDED_FACTORS_FILE} is missing; restore or retrain the adapter")
    embedded = group_factors(stored_factors) if stored_factors is not None else None
    R = {name: tensors.get(f"{name}.R") for name in config.modules}
    bad = [name for name, r in R.items() if r is None or tuple(r.shape) != (config.rank, config.rank)]
    if bad:
        raise BadInputError(f"{root}: {WEIGHTS_FILE} lacks a {config.rank}x{config.rank} R for {bad[0]}")
    head = {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    if embedded is not None and set(config.modules) - set(embedded):
        raise BadInputError(f"{root}: {EMBEDDED_FACTORS_FILE} does not cover every target module")
    return Adapter(root, config, {k: v.float() for k, v in R.items()}, head, embedded)


def flat_factors(factors: dict[str, dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor] | None:
    """{module: {"A", "B"[, "S"]}} as the flat float32 `<module>.<part>` tensors a file stores."""
    if factors is None:
        return None
    return {
        f"{m}.{k}": v.detach().float().cpu().contiguous()
        for m, parts in factors.items()
        for k, v in parts.items()
    }


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes: it survives re-serialisation
    (pack/unpack), unlike a hash of a file's bytes."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


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


def group_factors(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of flat_factors: `<module>.<part>` tensors back to {module: {part: tensor}}."""
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
            f"adapter {adapter.label} was trained on base {adapter.config.base.get('spec')!r} "
            f"(fingerprint {expected}), not on {spec!r} (fingerprint {fingerprint})"
        )


def adapter_factors(adapter: Adapter, cache=None) -> dict[str, dict[str, torch.Tensor]]:
    """The frozen factors this adapter was trained on, sliced to its rank; refuses any other set."""
    rank, wanted = adapter.config.rank, adapter.config.factors
    if adapter.factors is not None:
        return {
            m: {k: v[:rank] if k in ("A", "S") else v[:, :rank] for k, v in adapter.factors[m].items()}
            for m in adapter.config.modules
        }
    cache = cache or FactorCache()
    entry = cache.get(wanted.get("id", ""))
    if entry is None:
        raise MissingFactorsError(
            f"factors {wanted.get('id')} of adapter {adapter.label} are not in the cache "
            f"(LORAXS_HOME={loraxs_home()}); run `{recompute_command(adapter.config)}` to recompute them "
            f"(the same recipe gives the same factors{_sb_data_note(adapter.config)}), or use an adapter "
            "saved with --embed-factors"
        )
    if entry.sha256 != wanted.get("sha256"):
        raise IncompatibleError(
            f"adapter {adapter.label} was trained on factor set {wanted.get('id')} with sha256 "
            f"{str(wanted.get('sha256'))[:12]}, but the cache holds {entry.sha256[:12]} under that id"
        )
    return entry.load(rank, adapter.config.modules)


def targets_spec(modules: list[str], all_modules=None) -> str:
    """The shortest `--targets` value that selects exactly `modules` among `all_modules` (the base's
    linear modules): their last one, two or three name parts, else the full names."""
    wanted = set(modules)
    for depth in (1, 2, 3):
        suffixes = sorted({".".join(m.split(".")[-depth:]) for m in wanted})
        if (
            all_modules is not None
            and {m for m in all_modules if any(m == s or m.endswith("." + s) for s in suffixes)} == wanted
        ):
            return ",".join(suffixes)
    return ",".join(sorted(wanted))


_DTYPE_FLAGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def recompute_command(config: AdapterConfig, spec: str | None = None) -> str:
    """The `loraxs init` command that recomputes this adapter's factor set (the recipe it recorded), for
    the base `spec` (default: its hub id, else the spec it was given as)."""
    factors = config.factors
    recipe = factors.get("recipe") or {}
    spec = spec or config.base.get("repo_id") or config.base.get("spec")
    words = ["loraxs", "init", shlex.quote(str(spec)), "--rank", str(factors.get("r_max") or config.rank)]
    words += ["--targets", shlex.quote(factors.get("targets") or ",".join(config.modules))]
    svd = recipe.get("svd") or {}
    for key, flag in (
        ("backend", "--svd"),
        ("niter", "--niter"),
        ("oversample", "--oversample"),
        ("seed", "--seed"),
    ):
        if key in svd:
            words += [flag, str(svd[key])]
    if recipe.get("weights_dtype"):
        words += ["--dtype", _DTYPE_FLAGS.get(recipe["weights_dtype"], recipe["weights_dtype"])]
    method = method_of(factors.get("method"), recipe.get("extra"))
    words += method.recompute_args(method.record(recipe.get("extra")), config.task)
    return " ".join(words)


def _sb_data_note(config: AdapterConfig) -> str:
    """What the recompute command needs besides the base (LoRA-SB: the training data), or ""."""
    extra = (config.factors.get("recipe") or {}).get("extra")
    method = method_of(config.factors.get("method"), extra)
    return method.data_note(method.record(extra))


def hub_base(base: dict) -> tuple[str, str | None] | None:
    """(repo id, commit) of the base on the Hugging Face Hub, or None when none is known: the id the
    base was resolved from, the repo of a huggingface_hub cache snapshot it was given as a path (also
    read from the spec of adapters older than `hub_id`), never a local path."""
    if base.get("repo_id"):
        return str(base["repo_id"]), base.get("commit")
    if base.get("hub_id"):
        return str(base["hub_id"]), base.get("hub_commit")
    spec = base.get("spec")
    return cached_snapshot_repo(str(spec).rstrip("/\\")) if spec else None


def card_base_name(base: dict) -> tuple[str, bool]:
    """How a model card names the base: its hub repo id (hub_base), else the local directory's (or GGUF
    file's) name, never an absolute local path; the flag says no hub id is known."""
    hub = hub_base(base)
    if hub:
        return hub[0], False
    spec = str(base.get("spec") or "unknown")
    return Path(spec.rstrip("/\\")).name or spec, True


# The Hub's task ids (pipeline_tag) for loraxs's tasks.
HUB_TASKS = {
    "causal-lm": "text-generation",
    "preference": "text-generation",
    "seq-cls": "text-classification",
    "regression": "text-classification",
}
# The front matter's keys in the order a reader expects them (huggingface_hub keeps a card's order).
_FRONT_MATTER_ORDER = [
    "base_model",
    "base_model_relation",
    "library_name",
    "pipeline_tag",
    "tags",
    "datasets",
    "model-index",
]


def card_data(
    base: dict,
    tags: Sequence[str],
    library: str | None = None,
    *,
    relation: str | None = None,
    pipeline_tag: str | None = None,
    datasets: list[str] | None = None,
    eval_results: list | None = None,
    model_name: str | None = None,
):
    """The model card metadata (huggingface_hub.ModelCardData) of every card loraxs writes (adapter,
    merged model, PEFT export): `base_model` only as a hub id (hub_base), never a local path."""
    from huggingface_hub import ModelCardData

    hub = hub_base(base)
    return ModelCardData(
        base_model=hub[0] if hub else None,
        base_model_relation=relation if hub else None,
        library_name=library,
        pipeline_tag=pipeline_tag,
        tags=list(tags),
        datasets=datasets or None,
        eval_results=eval_results or None,
        model_name=model_name if eval_results else None,
    )


def render_card(data, body: str) -> str:
    """A model card: the metadata as YAML front matter, then `body`. Parsed back by huggingface_hub's
    ModelCard, which validates the metadata (a malformed model-index raises) and writes the text."""
    from huggingface_hub import ModelCard

    yaml = data.to_yaml(original_order=_FRONT_MATTER_ORDER)
    return str(ModelCard(f"---\n{yaml}\n---\n\n{body}"))


def card_front_matter(base: dict, tags: Sequence[str], library: str | None = None) -> list[str]:
    """The YAML block that opens a merged model's or a PEFT export's card (card_data): library, base
    model (only as a hub id) and tags; then an empty line."""
    yaml = card_data(base, tags, library).to_yaml(original_order=_FRONT_MATTER_ORDER)
    return ["---", *yaml.splitlines(), "---", ""]


def _share(value) -> str:
    """0.1 -> "10%"."""
    return f"{float(value) * 100:.4g}%"


def _describe_data(data) -> str:
    """The training data in words, never a local path (a file or directory is named by its name), e.g.
    `train.jsonl (sha256 0123456789ab), 1,080 rows trained on, 120 held out (10%)` or `the Hugging Face
    dataset org/name (config en, split train, revision main), 1,200 rows trained on`."""
    if not isinstance(data, dict):
        return str(data)
    name = str(data.get("file") or Path(str(data.get("path", "?")).rstrip("/\\")).name)
    kind = data.get("kind")
    if data.get("id"):  # a dataset on the Hub, loaded through `datasets`
        text, facts = f"the Hugging Face dataset {data['id']}", ("config", "split", "revision")
    else:
        saved = {"disk": "the saved dataset", "folder": "the dataset folder"}.get(kind)
        text, facts = (f"{saved} {name}", ("split",)) if saved else (name, ())
    where = [f"{key} {data[key]}" for key in facts if data.get(key)]
    if data.get("sha256"):
        where.append(f"sha256 {str(data['sha256'])[:12]}")
    text += f" ({', '.join(where)})" if where else ""
    if data.get("columns"):
        columns = data["columns"]
        mapped = ",".join(f"{k}={v}" for k, v in columns.items()) if isinstance(columns, dict) else columns
        text += f", columns {mapped}"
    if data.get("streaming"):
        text += ", streamed"
    if data.get("rows"):
        text += f", {data['rows']:,} rows trained on"
        if data.get("examples") is not None and data.get("examples") != data.get("rows"):
            text += f" ({data['examples']:,} examples)"
    held = data.get("eval_examples")
    if data.get("eval_data"):
        eval_name = Path(str(data["eval_data"]).rstrip("/\\")).name
        text += f"; evaluated on {eval_name}" + (f" ({held:,} examples)" if held else "")
    elif data.get("eval_split"):
        text += f", {f'{held:,} ' if held else ''}held out ({_share(data['eval_split'])})"
    return text


_METRIC_NOTES = {
    "steps": "optimizer steps",
    "train_loss": "training loss of the last step",
    "eval_examples": "held-out examples",
    "best_step": "the step of the best evaluation, kept in best/",
}


def _metric_note(key: str) -> str:
    if key in _METRIC_NOTES:
        return _METRIC_NOTES[key]
    if key.startswith("eval_"):
        return f"{key.removeprefix('eval_')} on the held-out data"
    if key.startswith("best_"):
        return f"{key.removeprefix('best_')} at the best step"
    return ""


def _eval_results(config: AdapterConfig, model_name: str) -> list:
    """model-index entries (huggingface_hub.EvalResult) for the held-out metrics when the data is a Hub
    dataset (model-index names a dataset by its hub id); a local file gets the table only."""
    from huggingface_hub import EvalResult

    data = config.extra.get("data")
    metrics = config.extra.get("metrics") or {}
    task = HUB_TASKS.get(config.task or "")
    if not (isinstance(data, dict) and data.get("id") and task) or data.get("eval_data"):
        return []
    split = data.get("split") or "train"
    name = f"{data['id']}" + (
        f" ({_share(data['eval_split'])} of {split} held out)" if data.get("eval_split") else ""
    )
    return [
        EvalResult(
            task_type=task,
            dataset_type=str(data["id"]),
            dataset_name=name,
            dataset_config=data.get("config"),
            dataset_split=split,
            dataset_revision=data.get("revision"),
            metric_type=key.removeprefix("eval_"),
            metric_value=value,
        )
        for key, value in metrics.items()
        if key.startswith("eval_") and key != "eval_examples" and isinstance(value, int | float)
    ]


def trained_quantized(config: AdapterConfig) -> str | None:
    """The quantization of the base the adapter was trained on (`train --quantize`: int8, nf4), or None.
    Its factors are the full-precision base's either way."""
    return (config.extra.get("training") or {}).get("quantized")


_METHOD_LINKS = {
    "xs": "[LoRA-XS](https://arxiv.org/abs/2405.17604)",
    "sb": "[LoRA-SB](https://arxiv.org/abs/2411.19557)",
}
_METHOD_HOW = {
    "xs": "the frozen factors B and A come from the truncated SVD of each target weight W, and ",
    "sb": "the frozen factors B and A come from the approximated first step of full fine-tuning, and ",
}


def default_card(
    config: AdapterConfig,
    *,
    head_params: int | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
) -> str:
    """The model card of an adapter (README.md, what `train` writes and `push` uploads): huggingface_hub
    metadata (card_data; base_model only as a hub id, library_name, pipeline_tag, tags, datasets and a
    model-index when the data is a Hub dataset), then the method, rank, targets, trainable numbers,
    base, factors, data in words, a metrics table and how to use it. `repo_id`/`revision`: where it is
    pushed (the usage names it); `head_params`: the numbers of its task head."""
    embedded = EMBEDDED_FACTORS_FILE in config.tensors_sha256  # it holds its factors (save_adapter)
    base, local = card_base_name(config.base)
    method = method_of(config.method)
    title = method.title or f"LoRA-{config.method.upper()}"
    params = config.rank * config.rank * len(config.modules)
    metrics = config.extra.get("metrics") or {}
    data = config.extra.get("data")
    task = HUB_TASKS.get(config.task or "")
    model_name = repo_id or f"{base}-{config.method}-r{config.rank}"
    tags = ["loraxs", *method.adapter_tags, *([task] if task else [])]
    if config.task == "regression":
        tags.append("regression")
    meta = card_data(
        config.base,
        tags,
        "loraxs",
        relation="adapter",
        pipeline_tag=task,
        datasets=[str(data["id"])] if isinstance(data, dict) and data.get("id") else None,
        eval_results=_eval_results(config, model_name),
        model_name=model_name,
    )
    hub = hub_base(config.base)
    if local:
        base_line = (
            f"- base model: {base} (a local model: no Hugging Face Hub id is known for it, so this card "
            "names no `base_model`)"
        )
    else:
        commit = f", commit {hub[1][:12]}" if hub and hub[1] else ""
        base_line = f"- base model: [{base}](https://huggingface.co/{base}) (Hugging Face Hub){commit}"
    base_line += f", fingerprint {config.base.get('fingerprint')}"
    # the `--targets` value recorded; older records: the modules' last names, not hundreds of full names
    names = sorted({m.rsplit(".", 1)[-1] for m in config.modules})
    targets = config.factors.get("targets") or ",".join(names)
    trainable = f"{params:,} in R ({len(config.modules)} modules x {config.rank}x{config.rank})"
    if head_params:
        trainable += f" + {head_params:,} in the task head"
    lines = [
        f"# {title} adapter for {base}",
        "",
        f"A {_METHOD_LINKS.get(config.method, title)} adapter, trained with loraxs: "
        f"{_METHOD_HOW.get(config.method, '')}only an r x r matrix R between them is trained per target "
        "module (h = W x + s B R A x).",
        "",
        f"- method: {title}, rank {config.rank}, alpha {config.alpha:g} (scaling {config.scaling:g})",
        f"- target modules: {targets} ({len(config.modules)} modules)",
        f"- trainable numbers: {trainable}",
        f"- task: {config.task or 'none'}"
        + (f", labels: {', '.join(config.labels)}" if config.labels else ""),
        base_line,
        f"- factor set: {config.factors.get('id')} (sha256 {str(config.factors.get('sha256'))[:12]})"
        + (", embedded in factors.safetensors" if embedded else ""),
    ]
    if data:
        lines.append(f"- training data: {_describe_data(data)}")
    if trained_quantized(config):
        lines.append(
            f"- trained on the base quantized to {trained_quantized(config)} (`--quantize`); the factors are "
            "the full-precision base's, so the adapter also runs on (and merges into) the full-precision base"
        )
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value | what it measures |", "|---|---|---|"]
        lines += [f"| {key} | {value} | {_metric_note(key)} |" for key, value in metrics.items()]
    where = f"{repo_id}@{revision}" if repo_id and revision else repo_id or "ADAPTER_DIR"
    base_arg = base if not local else "BASE_DIR"
    lines += ["", "## Use", "", "```bash"]
    if not embedded:  # R only: the factors are recomputed from the base, once, by the same recipe
        lines.append(f"{recompute_command(config, base_arg)}   # the frozen factors, once")
    lines += [f"loraxs eval {base_arg} -a {where} --data test.jsonl", "```", ""]
    note = "" if embedded else _sb_data_note(config).removeprefix("; ")
    if note:
        lines += [f"In the `loraxs init` line, {note}.", ""]
    lines += [
        "This is not a PEFT LoRA: load it with `loraxs`, or export it with",
        "`loraxs convert ADAPTER --to peft-lora --out DIR`.",
        "",
    ]
    return render_card(meta, "\n".join(lines))


def apply_adapter(model: torch.nn.Module, adapter: Adapter, cache=None) -> dict:
    """Inject the adapter into `model` (its backbone) with its own factors, R and task head.

    The caller checks the base first (`check_base`). Returns name -> XSLinear.
    """
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
