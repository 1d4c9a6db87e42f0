"""`train --distributed fsdp`: the frozen base sharded across the torchrun processes with FSDP2
(`torch.distributed.fsdp.fully_shard`), built so that no process ever holds the whole model:

    1. the model from its config on the meta device (no memory, no weights)
    2. fully_shard on each transformer block (`_no_split_modules`, else transformers' checkpointing
       layers), then on the root; a trainable task head (seq-cls, regression) is left out of it
    3. to_empty(device): each process allocates only its own shard (1/N of the rows of each weight)
    4. each shard read from the safetensors files (safe_open + get_slice: only this process's rows)
    5. transformers' own initialisation (`initialize_weights`, the way from_pretrained does it) for
       what was not loaded: a fresh head from the run's seed, and the non-persistent buffers such as
       rotary `inv_freq` (to_empty leaves them uninitialised)

Only then are the LoRA-XS layers injected (setup.py), outside FSDP's parameter groups: the r x r R's and
the head stay plain float32 tensors, replicated on every process, and their gradients are averaged by
one all-reduce per step (`Dist.average_`, what DDP does). Sharding an r x r matrix would save nothing,
and every consumer of R (AdamW and its state, checkpoints and exact resume, the adapter, gradient
clipping, the LR range test) would have to handle DTensors; FSDP still shards all of the base, which is
what does not fit. A and B are small non-persistent buffers: replicated, never sharded (FSDP2 shards
parameters only).

The base keeps its dtype (no MixedPrecisionPolicy: its weights are already stored in the dtype they
are computed in, and R never passes through FSDP, so its gradient stays float32).
"""

from __future__ import annotations

import inspect
import json
import os
import resource
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import BadInputError, UsageError
from ..models import ResolvedModel, backbone, quiet_transformers

# torch.distributed's FSDP, DeviceMesh and DTensor modules are imported inside the functions that need
# them: they add about a second to every start, and only a run under torchrun with fsdp uses them.

# The model class of each head (as models.load_model picks it for from_pretrained).
HEAD_CLASSES = {
    "base": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
}
MEMORY_REPORT_ENV = "LORAXS_MEMORY_REPORT"  # a directory: each process writes rank-N.json there (tests)


def fully_shard_api():
    """torch's FSDP2 entry point (torch >= 2.6 with `ignored_params`), or a one-line refusal."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise UsageError(
            f"--distributed fsdp needs FSDP2 (torch 2.7 or later); this is torch {torch.__version__}"
        )
    return fully_shard


def build_sharded(
    resolved: ResolvedModel,
    head_kwargs: dict,
    dtype: torch.dtype,
    seed: int,
    device: torch.device,
    world: int,
) -> nn.Module:
    """The base model with `head_kwargs`' head (models.head_kwargs), sharded across `world` processes,
    each process holding and reading only its own shard; in eval mode, every parameter frozen but a
    fresh head (which is left unsharded, as a plain tensor, so that it trains as R does)."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = fully_shard_api()
    files = _weight_files(resolved)
    quiet_transformers()
    kwargs = dict(head_kwargs)
    head = kwargs.pop("head", "base")
    kwargs.pop("ignore_mismatched_sizes", None)  # a head of another shape is re-initialised below
    config = transformers.AutoConfig.from_pretrained(str(resolved.path), **kwargs)
    model_class = getattr(transformers, HEAD_CLASSES[head])
    with torch.device("meta"):
        model = model_class.from_config(config, dtype=dtype)
    core = {id(p) for p in backbone(model).parameters()}
    fresh_head = head not in ("base", "causal-lm")
    head_names = {n for n, p in model.named_parameters() if fresh_head and id(p) not in core}
    head_params = {p for n, p in model.named_parameters() if n in head_names}
    mesh = init_device_mesh(device.type, (world,))
    for block in reversed(transformer_blocks(model)):  # bottom-up, as fully_shard wants
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=head_params or None)
    model.to_empty(device=device)
    missing = load_shards(model, files, head_names)
    torch.manual_seed(seed)  # the fresh head that `train --seed` gets from from_pretrained
    with torch.no_grad():
        model.initialize_weights()  # skips what load_shards loaded (transformers' `_is_hf_initialized`)
    if missing:  # everything but a fresh head must come from the weight files
        raise BadInputError(
            f"{resolved.spec}: {len(missing)} weight(s) of the model are not in its safetensors files "
            f"({', '.join(sorted(missing)[:3])}, ...) and cannot be read shard by shard; "
            "use --distributed ddp"
        )
    model.requires_grad_(False)
    model.eval()
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one (decoder or encoder layers), in model order: the classes
    named in the model's `_no_split_modules`, else transformers' gradient-checkpointing layers."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:
            return []
        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    # Only the outermost: a block inside another block shards with it.
    inner = {id(c) for b in blocks for c in b.modules() if c is not b}
    return [b for b in blocks if id(b) not in inner]


def _weight_files(resolved: ResolvedModel) -> list[Path]:
    if resolved.gguf_file:
        raise BadInputError(
            f"{resolved.spec}: --distributed fsdp reads safetensors weights shard by shard; a GGUF file is "
            "dequantized whole: use --distributed ddp"
        )
    files = sorted(resolved.path.glob("*.safetensors"))
    if not files:
        raise BadInputError(
            f"{resolved.spec}: --distributed fsdp reads safetensors weights shard by shard; this model has "
            "none (a .bin file is read whole): use --distributed ddp"
        )
    return files


def load_shards(model: nn.Module, files: list[Path], head_names: set[str]) -> set[str]:
    """Copy this process's shard of every parameter (and every persistent buffer) from the weight files
    into `model` (after to_empty); returns the names left unloaded that must be (not a fresh head's).
    Each sharded weight is read as its rows [start, stop) only: FSDP2 shards dim 0 as torch.chunk does."""
    from torch.distributed.tensor import DTensor

    tensors = _model_tensors(model)
    name_of = _checkpoint_names(model, {n for names, _ in tensors.values() for n in names})
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        where = {}
        for handle in handles:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = name_of(key)
                if name is not None:
                    where.setdefault(name, (handle, key))
        missing = set()
        for names, tensor in tensors.values():
            found = next((where[n] for n in names if n in where), None)
            is_head = any(n in head_names for n in names)
            if found is None:
                if not is_head:
                    missing.add(names[0])
                continue
            handle, key = found
            source = handle.get_slice(key)
            shape = tuple(source.get_shape())
            if shape != tuple(tensor.shape):
                if is_head:  # a classifier for another label set: a fresh head (ignore_mismatched_sizes)
                    continue
                raise BadInputError(f"{key}: {shape} in the weight files, {tuple(tensor.shape)} in the model")
            with torch.no_grad():
                if isinstance(tensor, DTensor):
                    local = tensor.to_local()
                    start, stop = shard_rows(shape[0] if shape else 1, tensor.device_mesh)
                    if local.numel():
                        if local.shape[0] != stop - start:
                            raise RuntimeError(
                                f"{key}: local shard of {local.shape[0]} rows, expected {stop - start}"
                            )
                        local.copy_(source[start:stop])
                else:
                    tensor.copy_(handle.get_tensor(key))
            tensor._is_hf_initialized = True  # transformers' initialize_weights leaves it as loaded
    return missing


def shard_rows(rows: int, mesh) -> tuple[int, int]:
    """This process's rows [start, stop) of a dim-0 sharded tensor: torch.chunk's split (chunks of
    ceil(rows / N), the last ones shorter or empty), which is FSDP2's."""
    world, rank = mesh.size(), mesh.get_local_rank()
    size = -(-rows // world)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def _model_tensors(model: nn.Module) -> dict[int, tuple[list[str], torch.Tensor]]:
    """id -> (every name, the tensor) of the parameters (tied ones once, under all their names) and the
    persistent buffers: what a checkpoint holds."""
    found: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(param), ([], param))[0].append(name)
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                full = f"{module_name}.{name}" if module_name else name
                found.setdefault(id(buffer), ([], buffer))[0].append(full)
    return found


def _checkpoint_names(model: nn.Module, known: set[str]) -> Callable[[str], str | None]:
    """checkpoint key -> the model's name for it (one of `known`), or None: not in the model. As
    from_pretrained maps them: transformers' renamings (LayerNorm.gamma -> .weight, ...), and the
    base-model prefix added or stripped. A checkpoint that needs transformers' weight conversions
    (fused experts, ...) cannot be read shard by shard and is refused."""
    rename = _renaming(model)
    prefix = getattr(model, "base_model_prefix", "") or ""

    def name_of(key: str) -> str | None:
        renamed, converted = rename(key)
        if converted:
            raise BadInputError(
                f"{key}: this model's weights are converted by transformers on loading and cannot be "
                "read shard by shard; use --distributed ddp"
            )
        for candidate in (renamed, key):
            if candidate in known:
                return candidate
            if prefix and candidate.startswith(prefix + ".") and candidate[len(prefix) + 1 :] in known:
                return candidate[len(prefix) + 1 :]
            if prefix and f"{prefix}.{candidate}" in known:
                return f"{prefix}.{candidate}"
        return None

    return name_of


def _renaming(model: nn.Module) -> Callable[[str], tuple[str, bool]]:
    """key -> (the key after transformers' renamings, whether a weight converter claims it); the key
    itself with a transformers without a conversion mapping (core_model_loading came with 5.x)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):
        return lambda key: (key, False)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]

    def rename(key: str) -> tuple[str, bool]:
        renamed, pattern = rename_source_key(key, renamings, converters)
        return renamed, pattern is not None

    return rename


# ----------------------------------------------------------------------------------------------
# What each process holds: `LORAXS_MEMORY_REPORT=DIR` writes DIR/rank-N.json (the tests compare them)


def base_bytes(model: nn.Module) -> dict:
    """Bytes of the frozen base's parameters held by this process (its local shards under FSDP) and
    in the whole model; trainable parameters (R, a head) are not counted."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for param in model.parameters():
        if param.requires_grad:
            continue
        item = param.element_size()
        full += param.numel() * item
        local += (param.to_local() if isinstance(param, DTensor) else param).numel() * item
    return {"base_bytes_local": local, "base_bytes_full": full}


def report_memory(model: nn.Module, rank: int, mode: str, stage: str) -> None:
    """With LORAXS_MEMORY_REPORT set: add this process's base bytes and peak RSS at `stage` to
    DIR/rank-N.json (a test hook; nothing is written without the variable)."""
    directory = os.environ.get(MEMORY_REPORT_ENV)
    if not directory:
        return
    path = Path(directory) / f"rank-{rank}.json"
    document = json.loads(path.read_text()) if path.exists() else {}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    document[stage] = {"mode": mode, **base_bytes(model), "peak_rss_bytes": peak_kib * 1024}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
