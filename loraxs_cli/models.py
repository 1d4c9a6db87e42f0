"""Resolve a base model (local directory, Hugging Face id, GGUF file), load it, and find its targets.

Module names are always *backbone-relative* (relative to `model.base_model`, e.g.
`layers.0.self_attn.q_proj` for every Llama head class), so one factor set serves a causal LM,
a classifier and a bare encoder built on the same weights.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import pickle
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .errors import BadInputError
from .linear import is_conv1d, is_linear, weight_matrix, weight_shape  # noqa: F401 - re-exported: the layer primitives' home is linear.py
from .quantize import quantize_linears

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
# What a model needs besides its weights; everything else in a hub repo is skipped.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")

# Default targets per architecture (short names, matched against the last name components).
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The official LoRA-XS and LoRA-SB GLUE code (main_glue.py; models.py create_peft_model): query, value,
# the attention output and the FFN output `layer.N.output.dense` (a suffix that also matches
# `attention.output.dense`, as in PEFT). The LoRA-XS paper's appendix says "FC_1"; its code does not.
_BERT_LIKE = ("query", "value", "attention.output.dense", "output.dense")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"),
        _LLAMA_LIKE,
    ),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "deberta-v2", "electra"), _BERT_LIKE),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
ALL_LINEAR = "all-linear"
_GENERIC_DIR_NAMES = {"model", "models", "weights", "checkpoint", "final", "hf", "merged"}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a base model's files are, and how the user named it."""

    spec: str  # what the user typed
    kind: str  # "dir", "hub" or "gguf"
    path: Path  # the model directory (for gguf: the directory holding the file)
    gguf_file: str | None = None
    repo_id: str | None = None
    commit: str | None = None

    @property
    def slug(self) -> str:
        """A readable, filesystem-safe name for cache directories."""
        if self.repo_id:
            name = self.repo_id.replace("/", "--")
        elif self.gguf_file:
            name = Path(self.gguf_file).stem
        elif self.path.name.lower() in _GENERIC_DIR_NAMES:
            name = f"{self.path.parent.name}-{self.path.name}"
        else:
            name = self.path.name or "model"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:80]

    def from_pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def hub_source(self) -> tuple[str, str | None] | None:
        """(repo id, commit) of the Hub repo these weights come from: the id they were resolved from,
        or the one a Hugging Face cache snapshot directory names when given as a path; None for any
        other local model (a model card then names no `base_model`)."""
        if self.repo_id:
            return self.repo_id, self.commit
        if self.kind == "preset":
            return None
        spec = Path(self.spec).expanduser().absolute()
        for path in (self.path, spec, spec.parent):
            found = cached_snapshot_repo(path)
            if found:
                return found
        return None


@dataclass(frozen=True)
class LinearInfo:
    """A linear layer as the math sees it: W is (out_features, in_features)."""

    name: str
    out_features: int
    in_features: int
    is_conv1d: bool


def cached_snapshot_repo(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) for a snapshot directory of huggingface_hub's cache,
    `.../models--ORG--NAME/snapshots/COMMIT`, else None. The folder name is huggingface_hub's own
    (file_download.repo_folder_name), read back as its scan_cache_dir does: the repo type, then the id
    with `--` for `/` (the Hub allows no `--` in a name)."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH

    parts = Path(path).parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not REGEX_COMMIT_HASH.fullmatch(parts[-1]):
        return None
    kind, _, name = parts[-3].partition("--")
    if kind != "models" or not name:
        return None
    return name.replace("--", "/"), parts[-1]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (read now, not at import as huggingface_hub does)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model(spec: str, revision: str | None = None) -> ResolvedModel:
    """Turn a user's MODEL argument into files on disk, or raise BadInputError."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise BadInputError(f"{spec}: a model is a directory, a Hugging Face id or a .gguf file")
        return ResolvedModel(spec, "gguf", path.resolve().parent, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedModel(spec, "gguf", path.resolve(), gguf_file=ggufs[0].name)
            raise BadInputError(f"{spec}: not a model directory (no config.json)")
        return ResolvedModel(spec, "dir", path.resolve())
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.startswith((".", "/")):
        return _resolve_hub(spec, revision)
    raise BadInputError(f"{spec}: no such model directory or file")


def resolve_config_only(spec: str, revision: str | None = None) -> ResolvedModel:
    """Like resolve_model, for commands that need only the config (a config.json path is accepted)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        return ResolvedModel(spec, "dir", path.resolve().parent)
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/")):
        return _resolve_hub(spec, revision, patterns=("config.json",))
    return resolve_model(spec, revision)


def _resolve_hub(
    repo_id: str, revision: str | None, patterns: Sequence[str] = MODEL_FILE_PATTERNS
) -> ResolvedModel:
    """Resolve a hub id through huggingface_hub's cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE).

    The local cache is tried first so that a cached model never waits on the network. A failure
    says why (offline, unreachable, gated, private or unknown id, unknown revision) and what to do.
    """
    from huggingface_hub import snapshot_download

    def download(local_only: bool) -> str:
        return snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(patterns),
            local_files_only=local_only,
        )

    try:
        folder = download(local_only=True)
    except Exception as cached_error:
        if hub_offline():
            raise BadInputError(hub_problem(repo_id, revision, cached_error, offline=True)) from cached_error
        try:
            folder = download(local_only=False)
        except Exception as error:
            raise BadInputError(hub_problem(repo_id, revision, error)) from error
    folder_path = Path(folder)
    if not (folder_path / "config.json").is_file():
        raise BadInputError(f"{repo_id}: the cached snapshot has no config.json")
    return ResolvedModel(repo_id, "hub", folder_path, repo_id=repo_id, commit=folder_path.name)


def hub_problem(
    repo_id: str,
    revision: str | None,
    error: Exception,
    *,
    offline: bool = False,
    what: str = "model",
    revision_flag: str = "--revision",
    instead: str = "pass a local directory",
) -> str:
    """One line for a hub id that huggingface_hub could not provide: the reason and the remedy.

    Maps huggingface_hub's exception types; `offline` means HF_HUB_OFFLINE is set. `what` names the
    repo (a model, an adapter), `revision_flag` how the revision was given, `instead` the local way.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    download = f"download it with `hf download {repo_id}{f' --revision {revision}' if revision else ''}`"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, GatedRepoError):
        return (
            f"{repo_id} is a gated {what}: accept its conditions on its Hugging Face page, "
            "then log in with `hf auth login` (or set HF_TOKEN)"
        )
    if isinstance(error, RepositoryNotFoundError) or status == 401:
        return (
            f"{repo_id}: no such {what} on the Hugging Face Hub; check the id "
            f"(a private {what} needs `hf auth login` or HF_TOKEN)"
        )
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id}: no revision {revision!r} on the Hugging Face Hub; check {revision_flag}"
    if isinstance(error, IncompleteSnapshotError):
        return (
            f"{repo_id}: the cached copy{at} is incomplete and the Hub cannot be reached; "
            f"{download} again, or {instead}"
        )
    if offline or isinstance(error.__cause__, OfflineModeIsEnabled):
        return (
            f"{repo_id}: not in the Hugging Face cache{at} and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE "
            f"to let it download, {download}, or {instead} (cache: {constants.HF_HUB_CACHE})"
        )
    if isinstance(error, LocalEntryNotFoundError):  # huggingface_hub's answer to a network failure
        cause = f" ({type(error.__cause__).__name__})" if error.__cause__ is not None else ""
        return (
            f"{repo_id}: not in the Hugging Face cache{at} and the Hub cannot be reached{cause}; check "
            f"the network or proxy, {download} on a machine that can and set HF_HUB_OFFLINE=1, "
            f"or {instead}"
        )
    if isinstance(error, HfHubHTTPError):
        return f"{repo_id}: the Hugging Face Hub answered HTTP {status}; try again later, or {instead}"
    reason = f"{type(error).__name__}: {error}".splitlines()[0]
    return f"{repo_id}: the Hugging Face Hub could not provide it ({reason}); {instead}"


def weight_files(resolved: ResolvedModel) -> list[Path]:
    """The files that hold the weights (what the fingerprint hashes)."""
    if resolved.gguf_file:
        return [resolved.path / resolved.gguf_file]
    files = sorted(
        {p for pattern in WEIGHT_PATTERNS for p in resolved.path.glob(pattern) if p.suffix != ".gguf"}
    )
    if not files:
        raise BadInputError(f"{resolved.spec}: no weight files (*.safetensors, *.bin) in {resolved.path}")
    return files


def quiet_transformers() -> None:
    """Our own progress and messages replace transformers' bars and advisory warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def require_gguf_package(resolved: ResolvedModel) -> None:
    """Fail with one line before transformers logs its own multi-line advice."""
    if resolved.gguf_file and importlib.util.find_spec("gguf") is None:
        raise BadInputError(
            f"{resolved.spec}: reading a GGUF file needs the gguf package: pip install 'loraxs[gguf]'"
        )


def load_config(resolved: ResolvedModel):
    from transformers import AutoConfig

    quiet_transformers()
    require_gguf_package(resolved)
    try:
        return AutoConfig.from_pretrained(str(resolved.path), **resolved.from_pretrained_kwargs())
    except ImportError as error:
        raise BadInputError(f"{resolved.spec}: {error}".splitlines()[0]) from error
    except (OSError, ValueError, KeyError) as error:
        raise BadInputError(
            f"{resolved.spec}: cannot read the model config ({error})".splitlines()[0]
        ) from error
    except Exception as error:
        if not resolved.gguf_file:
            raise
        # transformers' GGUF reader fails on a truncated or foreign file with struct errors and the like.
        raise BadInputError(
            f"{resolved.spec}: not a readable GGUF file ({type(error).__name__}: {error})".splitlines()[0]
        ) from error


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'bf16' | 'bfloat16' | 'fp16' | 'float16' | 'fp32' | 'float32' | 'auto'/None -> torch dtype or None."""
    if name is None or name == "auto":
        return None
    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise BadInputError(f"unknown dtype {name!r}: use auto, fp32, bf16 or fp16") from None


def load_model(
    resolved: ResolvedModel,
    *,
    head: str = "base",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    **kwargs,
) -> nn.Module:
    """Load the base model with the requested head ("base", "causal-lm", "seq-cls").

    `quantize` ("int8", "nf4"): the backbone's linear layers become bitsandbytes layers, quantized on
    `device` from the weights as loaded (quantize.py); the head and the embeddings stay as loaded.

    GGUF checkpoints are dequantized by transformers; we rebuild a plain model from them so the
    result is not flagged as quantized (which would refuse training and saving).
    """
    import transformers

    quiet_transformers()
    require_gguf_package(resolved)
    classes = {
        "base": transformers.AutoModel,
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
    }
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    load_kwargs = {**resolved.from_pretrained_kwargs(), **kwargs}
    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype
    elif not resolved.gguf_file:
        load_kwargs["dtype"] = "auto"
    try:
        model = classes[head].from_pretrained(str(resolved.path), **load_kwargs)
    except SafetensorError as error:  # a truncated or damaged weights file
        raise BadInputError(f"{resolved.spec}: damaged weights file ({error})".splitlines()[0]) from error
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a .bin: never unpickled
        raise BadInputError(
            f"{resolved.spec}: a .bin weights file is a pickle holding more than plain tensors "
            "(it could run code); not loaded; use safetensors weights"
        ) from None
    except ImportError as error:
        raise BadInputError(f"{resolved.spec}: {error}".splitlines()[0]) from error
    except (OSError, ValueError, KeyError) as error:
        raise BadInputError(f"{resolved.spec}: cannot load the model ({error})".splitlines()[0]) from error
    if resolved.gguf_file:
        model = _dequantized_copy(model, classes[head], torch_dtype)
    if quantize:
        quantize_linears(backbone(model), quantize, device=device)
    if device:
        model.to(device)
    model.eval()
    return model


def _dequantized_copy(model: nn.Module, model_class, dtype: torch.dtype | None) -> nn.Module:
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = model_class.from_config(config, dtype=dtype or torch.float32)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    return plain


def skeleton(config) -> nn.Module:
    """The backbone built on the meta device: module names and shapes, no memory, no weights."""
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            return AutoModel.from_config(config)
    except (ValueError, KeyError, TypeError) as error:
        raise BadInputError(
            f"unsupported model type {config.model_type!r} ({error})".splitlines()[0]
        ) from error


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block (no dropout), its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def backbone(model: nn.Module) -> nn.Module:
    """The module that target names are relative to (`model.base_model` for transformers models)."""
    return getattr(model, "base_model", model)


def linear_modules(model: nn.Module) -> dict[str, LinearInfo]:
    """Every nn.Linear or GPT-2 Conv1D of the backbone, by backbone-relative name, in model order."""
    found: dict[str, LinearInfo] = {}
    for name, module in backbone(model).named_modules():
        if is_linear(module):
            found[name] = LinearInfo(name, *weight_shape(module), is_conv1d(module))
    return found


def default_targets(model_type: str) -> tuple[str, ...] | None:
    return DEFAULT_TARGETS.get(model_type)


def parse_targets(value: str | Sequence[str] | None) -> list[str] | None:
    """'q_proj,v_proj' or a list -> list of names; None keeps the architecture's default."""
    if value is None:
        return None
    items: Iterable[str] = value.split(",") if isinstance(value, str) else value
    names = [item.strip() for raw in items for item in raw.split(",") if item.strip()]
    return names or None


def _matches(name: str, target: str) -> bool:
    if any(ch in target for ch in "*?["):
        return fnmatch.fnmatchcase(name, target)
    return name == target or name.endswith("." + target)


def match_targets(
    modules: dict[str, LinearInfo], targets: Sequence[str] | None, model_type: str
) -> list[str]:
    """Module names selected by `targets` (short names, dotted suffixes, globs or 'all-linear').

    Raises BadInputError listing the model's linear module kinds when a target matches nothing.
    """
    if not targets:
        targets = default_targets(model_type)
        if targets is None:
            raise BadInputError(
                f"no default targets for model type {model_type!r}: pass --targets "
                f"(one of {_kinds(modules)} or {ALL_LINEAR})"
            )
    if list(targets) == [ALL_LINEAR]:
        # Like PEFT: every linear layer of the backbone; output heads are outside it.
        return list(modules)
    selected = [name for name in modules if any(_matches(name, t) for t in targets)]
    unmatched = [t for t in targets if not any(_matches(name, t) for name in modules)]
    if unmatched:
        raise BadInputError(
            f"target(s) {', '.join(unmatched)} match no linear module; this model has: {_kinds(modules)}"
        )
    return selected


def _kinds(modules: dict[str, LinearInfo]) -> str:
    """Distinct module names with layer indices removed, e.g. 'attention.self.query'."""
    kinds: dict[str, None] = {}
    for name in modules:
        kinds[re.sub(r"^.*?\.\d+\.", "", name)] = None
    return ", ".join(kinds) or "(none)"


def load_tokenizer(resolved: ResolvedModel):
    """The base's tokenizer, with a pad token (the EOS token when it has none) for batching."""
    from transformers import AutoTokenizer

    require_gguf_package(resolved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), **resolved.from_pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise BadInputError(f"{resolved.spec}: cannot load its tokenizer ({error})".splitlines()[0]) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = position_limit(load_config(resolved))
    if limit is not None:  # data.encode cuts examples here: a longer one would index past the positions
        tokenizer.model_max_length = limit
    return tokenizer


# Models whose position ids start after the padding index: max_position_embeddings - (pad + 1) usable.
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                            "roberta-prelayernorm", "mpnet", "longformer", "ibert", "xmod")  # fmt: skip


def position_limit(config) -> int | None:
    """The most tokens a model takes in one sequence, from its config (max_position_embeddings,
    n_positions), or None when it declares none."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if getattr(config, "model_type", None) in PADDING_OFFSET_POSITIONS:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value if value > 0 else None
    return None


def head_kwargs(task: str, labels: list[str] | None) -> dict:
    """load_model arguments for a task: the head class, and the label map of a classifier."""
    if task in ("causal-lm", "preference"):  # data.LM_TASKS: the language-model head, nothing new
        return {"head": "causal-lm"}
    # A base that is already a classifier for another label set gets a fresh head of the right size.
    fresh = {"head": "seq-cls", "ignore_mismatched_sizes": True}
    if task == "regression":
        return {**fresh, "num_labels": 1, "problem_type": "regression"}
    return {
        **fresh,
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "problem_type": "single_label_classification",
    }
