"""One base weight at a time, straight from the checkpoint: W (out, in) of a target, no model built.

`init --method xs` needs each target weight once. Loading the model for that holds every weight in
memory; reading them one by one holds one or two. A reader gives each target's stored tensor in the
dtype the model would have been loaded in (the same bits as `load_model(..., dtype=)` gives), laid out
as the module stores it, and `matrix` turns it into the math's (out, in) view as `linear.weight_matrix`
does (GPT-2's Conv1D stores W^T):

- safetensors (a model directory or a Hugging Face cache snapshot, one file or shards with an index):
  each tensor through its own `safe_open`, so the memory map of a shard never outlives the read of one
  tensor (a handle kept open keeps every page it touched resident);
- GGUF: the tensor's bytes read from the file (not through the reader's memory map, for the same
  reason), dequantized by the `gguf` package and turned into the transformers tensor by transformers'
  own name map and tensor processor (the Llama q/k reverse permutation, GPT-2's transposes), exactly
  as its GGUF loader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`) does.

What cannot be mapped that exactly raises `NotStreamable` and the caller loads the model instead: a
`.bin`-only checkpoint (a pickle has no per-tensor access), a target whose key the checkpoint does not
hold as `<module>.weight` (renamed, fused or tied by transformers' conversion mapping), a value-changing
conversion of a target, and the GGUF architectures transformers loads through its newer mapping.

`safetensors_shards` and `weight_key` are also merge's: a module's tensor is found the same way by both.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import BadInputError, IncompatibleError
from .fsutil import loads_json
from .models import LinearInfo, ResolvedModel, backbone, skeleton

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

T = TypeVar("T")


class NotStreamable(Exception):
    """This checkpoint (or one of its targets) cannot be read tensor by tensor exactly as a load reads it."""


# ----------------------------------------------------------------------------------------------
# Where a module's weight is in a safetensors checkpoint (shared with merge)


def safetensors_shards(directory: Path, spec: str) -> tuple[list[Path], Path | None]:
    """The safetensors files of a model directory (every shard its index names) and the index, if any."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = loads_json(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise BadInputError(f"{index}: unreadable shard index ({error})") from error
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise BadInputError(f"{spec}: shard {missing[0]} named in {INDEX_FILE} is missing")
        return [directory / n for n in names], index
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single], None
    raise BadInputError(
        f"{spec}: no {SINGLE_FILE} or {INDEX_FILE}; merge needs safetensors weights "
        "(re-save the model with save_pretrained(safe_serialization=True))"
    )


def key_candidates(module: str, prefix: str) -> list[str]:
    """Where a backbone-relative module's weight may be stored: bare, or under the head's prefix."""
    return [f"{module}.weight"] + ([f"{prefix}.{module}.weight"] if prefix else [])


def weight_key(module: str, prefix: str, keys, spec: str) -> str:
    """The checkpoint key of a backbone-relative module's weight (bare, or under the head's prefix)."""
    candidates = key_candidates(module, prefix)
    found = [k for k in candidates if k in keys]
    if len(found) != 1:
        raise IncompatibleError(
            f"{spec}: cannot find the weight of {module} in the checkpoint "
            f"(looked for {' or '.join(candidates)}); is it tied to another tensor?"
        )
    return found[0]


# ----------------------------------------------------------------------------------------------
# Readers


class WeightReader:
    """`read(name)`: the stored weight of target `name`, in the dtype a load would give it."""

    def __init__(self, infos: dict[str, LinearInfo], dtypes: dict[str, torch.dtype]):
        self.infos = infos
        self.dtypes = dtypes  # per target: the load dtype (float32 where the model keeps it in fp32)

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def matrix(self, name: str) -> torch.Tensor:
        """W (out, in) of target `name`: what `weight_matrix(module).detach()` is after a load."""
        weight = self.read(name)
        return weight.t() if self.infos[name].is_conv1d else weight

    def matrices(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.matrix(name)


class SafetensorsReader(WeightReader):
    def __init__(self, infos, dtypes, files: dict[str, Path], keys: dict[str, str]):
        super().__init__(infos, dtypes)
        self.files = files  # target -> shard
        self.keys = keys  # target -> checkpoint key

    def read(self, name: str) -> torch.Tensor:
        path, key = self.files[name], self.keys[name]
        try:
            # The handle is closed at once: safetensors maps the file, and the map of a shard held open
            # keeps every page read from it resident. The tensor keeps only its own pages.
            with safe_open(str(path), framework="pt") as handle:
                tensor = handle.get_tensor(key)
        except SafetensorError as error:
            raise BadInputError(f"{path}: damaged weights file ({error})".splitlines()[0]) from error
        return tensor.to(self.dtypes[name])


class GGUFWeightReader(WeightReader):
    def __init__(self, infos, dtypes, path: Path, tensors: dict, processor, mapping: dict, expected: dict):
        super().__init__(infos, dtypes)
        self.path = path
        self.tensors = tensors  # target -> gguf ReaderTensor (its table entry; its mapped data is never read)
        self.processor = processor
        self.mapping = mapping  # gguf name -> transformers parameter name
        self.expected = expected  # target -> the transformers parameter name it must map to
        self._lock = threading.Lock()  # a tensor processor is not documented as thread-safe

    def read(self, name: str) -> torch.Tensor:
        from gguf import dequantize  # optional backend (loraxs[gguf]), as models.require_gguf_package says

        entry = self.tensors[name]
        # The bytes as the reader's own view holds them (dtype with byte order, shape), read into our
        # memory: the reader's map would keep every page touched resident for the whole run.
        data = np.fromfile(self.path, dtype=entry.data.dtype, count=entry.data.size, offset=entry.data_offset)
        weights = dequantize(data.reshape(entry.data.shape), entry.tensor_type)
        with self._lock:
            result = self.processor.process(
                weights=weights,
                name=entry.name,
                tensor_key_mapping=self.mapping,
                parsed_parameters={"tensors": {}},
            )
        if self.mapping.get(result.name) != self.expected[name]:
            raise NotStreamable(f"the GGUF tensor {entry.name} does not map to {self.expected[name]}")
        values = result.weights
        # transformers copies (np.copy) to own writable memory; an array that already is one is used
        # as it is: the same values, one copy less of the largest weight.
        if not (values.flags.c_contiguous and values.flags.writeable and values.flags.owndata):
            values = np.array(values, copy=True, order="C")
        return torch.from_numpy(values).to(self.dtypes[name])


def _param_name(module: str) -> str:
    return f"{module}.weight"


# ----------------------------------------------------------------------------------------------
# Opening a checkpoint


def streamable(resolved: ResolvedModel) -> bool:
    """Whether the checkpoint can be read tensor by tensor at all (safetensors or GGUF), from its files."""
    if resolved.gguf_file:
        return True
    path = resolved.path
    return (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()


def open_weights(
    resolved: ResolvedModel,
    config,
    infos: dict[str, LinearInfo],
    names: Sequence[str],
    dtype: torch.dtype,
) -> WeightReader:
    """A reader of the targets `names`; raises NotStreamable when a load is needed to get them exactly."""
    if not streamable(resolved):
        # A .bin-only checkpoint: torch.load unpickles the file whole, so there is nothing to stream.
        raise NotStreamable(f"{resolved.spec}: no safetensors or GGUF weights")
    meta_model = skeleton(config)
    targets = {n: infos[n] for n in names}
    dtypes = _load_dtypes(meta_model, targets, dtype)
    if resolved.gguf_file:
        return _open_gguf(resolved, config, meta_model, targets, dtypes)
    return _open_safetensors(resolved, meta_model, targets, dtypes)


def _load_dtypes(meta_model: nn.Module, targets: dict[str, LinearInfo], dtype: torch.dtype) -> dict:
    """The dtype each target's weight has after `from_pretrained(dtype=dtype)`: `dtype`, except where
    the model keeps modules in float32 (transformers' `_keep_in_fp32_modules` for float16, the
    `_strict` list for both half types; `PreTrainedModel._get_dtype_plan`), matched as transformers
    matches them (a regular-expression search in the parameter name, `*` as `.*`)."""
    patterns = []
    if dtype == torch.float16:
        patterns += list(getattr(meta_model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(meta_model, "_keep_in_fp32_modules_strict", None) or [])
    prefix = _backbone_path(meta_model)
    kept = re.compile("|".join(p.replace("*", ".*") for p in patterns)) if patterns else None
    return {
        n: torch.float32 if kept is not None and kept.search(prefix + _param_name(n)) else dtype
        for n in targets
    }


def _backbone_path(meta_model: nn.Module) -> str:
    """Where the backbone sits in the model `from_pretrained` builds ("" when it is the model)."""
    core = backbone(meta_model)
    if core is meta_model:
        return ""
    for name, module in meta_model.named_modules():
        if module is core:
            return name + "."
    return ""  # pragma: no cover - base_model is always a submodule


def _open_safetensors(resolved: ResolvedModel, meta_model, targets, dtypes) -> SafetensorsReader:
    shards, index = safetensors_shards(resolved.path, resolved.spec)
    if index is not None:
        weight_map = loads_json(index.read_text())["weight_map"]
        key_file = {key: resolved.path / shard for key, shard in weight_map.items()}
    else:
        try:
            with safe_open(str(shards[0]), framework="pt") as handle:
                key_file = dict.fromkeys(handle.keys(), shards[0])
        except SafetensorError as error:  # a damaged header: one line, exit 3, as when loading
            raise BadInputError(f"{resolved.spec}: damaged weights file ({error})".splitlines()[0]) from None
    prefix = getattr(meta_model, "base_model_prefix", "") or ""
    keys: dict[str, str] = {}
    for name in targets:
        try:
            keys[name] = weight_key(name, prefix, key_file, resolved.spec)
        except IncompatibleError as error:  # renamed or tied: transformers' conversion mapping finds it
            raise NotStreamable(str(error)) from None
    _refuse_converted(meta_model, keys)
    return SafetensorsReader(targets, dtypes, {n: key_file[k] for n, k in keys.items()}, keys)


def _refuse_converted(meta_model, keys: dict[str, str]) -> None:
    """A target whose checkpoint tensor transformers changes on the way in (a `WeightConverter`: fusing,
    splitting, permuting) is not read as stored; only plain renames leave the values alone."""
    try:  # inside: an import error here means an older transformers, not a broken install
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # pragma: no cover - transformers 5 has both
        return
    converters = [t for t in get_model_conversion_mapping(meta_model) if isinstance(t, WeightConverter)]
    for converter in converters:
        for pattern in converter.source_patterns:
            compiled = re.compile(pattern.replace("*", r".*"))
            hit = next((k for k in keys.values() if compiled.search(k)), None)
            if hit is not None:
                raise NotStreamable(f"transformers converts {hit} on loading")


def _open_gguf(resolved: ResolvedModel, config, meta_model, targets, dtypes) -> GGUFWeightReader:
    """The tensors of the targets in a GGUF file, mapped as transformers' legacy GGUF loader maps them."""
    # GGUF only: the optional backend, and transformers' GGUF loader that needs it
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    path = resolved.path / resolved.gguf_file
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:  # older transformers 5: every architecture goes through the legacy loader
        is_gguf_arch_supported = None
    if is_gguf_arch_supported is not None and is_gguf_arch_supported(architecture):
        # This architecture's GGUF goes through transformers' weight-conversion pipeline instead.
        raise NotStreamable(
            f"{resolved.spec}: transformers loads GGUF {architecture} through its new mapping"
        )
    gguf_config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=gguf_config)
    mapping = get_gguf_hf_weights_map(meta_model, processor)
    by_param = {}
    for gguf_name, param in mapping.items():
        by_param.setdefault(param, []).append(gguf_name)
    entries = {t.name: t for t in reader.tensors}
    prefix = _backbone_path(meta_model)
    expected = {n: prefix + _param_name(n) for n in targets}
    tensors = {}
    for name in targets:
        sources = [g for g in by_param.get(expected[name], []) if g in entries]
        if len(sources) != 1:
            raise NotStreamable(f"{resolved.spec}: no single GGUF tensor for {name}")
        tensors[name] = entries[sources[0]]
    return GGUFWeightReader(targets, dtypes, path, tensors, processor, mapping, expected)


# ----------------------------------------------------------------------------------------------
# Reading ahead


def one_ahead(items: Iterator[T]) -> Iterator[T]:
    """`items`, with the next one produced in a background thread while the caller works on the current
    one: at most two items alive (the caller's and the next), so memory stays at two weights."""
    done = object()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraxs-read")
    try:
        future = pool.submit(next, items, done)
        while True:
            box = [future.result()]
            if box[0] is done:
                return
            future = pool.submit(next, items, done)
            yield box.pop()  # the generator keeps no reference to what it hands out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# The memory a streamed computation plans for


def planned_peak_bytes(
    shapes: Iterable[tuple[int, int]],
    *,
    stored_itemsize: int,
    load_itemsize: int,
    factor_bytes: int,
    workspace_copies: int = 1,
) -> int:
    """Memory a streamed LoRA-XS compute adds, from the shapes alone: for the largest weight (L numbers),
    the next one being read (stored copy + its cast to the load dtype, L * (stored + load)), the
    current one in float32 (4 L), the SVD's full-size temporaries in float32 (`workspace_copies`
    * 4 L: the torch and sklearn backends make one, ||W||^2 = (W * W).sum(); the exact SVD three), and
    the factors computed so far (all of them, at the end)."""
    largest = max((m * n for m, n in shapes), default=0)
    per_number = stored_itemsize + load_itemsize + 4 + 4 * workspace_copies
    return largest * per_number + factor_bytes
