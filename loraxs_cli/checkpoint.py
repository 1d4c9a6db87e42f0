"""Training checkpoints without pickles: tensors in safetensors, everything else in JSON.

A checkpoint directory `checkpoints/step-N/` holds

    state.json            step, optimizer param groups, scheduler, python RNG, best, identity, data
                          position; every tensor in it is a reference {"__tensor__": KEY}
    state.safetensors     the tensors: R, head, optimizer moments, torch (and CUDA) RNG states

Loading reads JSON and safetensors only, so a run directory from someone else cannot run code.
Python values JSON cannot hold are tagged: tuples as {"__tuple__": [...]}, dicts with non-string
keys (an optimizer's per-parameter state) as {"__items__": [[key, value], ...]}. `state.json` records
the sha256 of the tensors file, so a damaged checkpoint is detected and skipped on resume.

Checkpoints of older loraxs versions (`state.pt`, a pickle) are refused with one line: unpickling
a file runs whatever code it names, and `torch.load(weights_only=True)` has had escapes.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import random
from pathlib import Path

import torch

from .errors import BadInputError
from .fsutil import loads_json

STATE_FILE = "state.json"
TENSORS_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # earlier loraxs versions: a torch.save pickle, never loaded
FORMAT = "loraxs-checkpoint"
VERSION = 1
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class LegacyCheckpointError(BadInputError):
    """A pickled checkpoint of an older version: refused, never skipped (the run cannot continue)."""


def is_checkpoint(path: Path) -> bool:
    """A complete checkpoint directory of this format or of the old pickle format."""
    return (path / STATE_FILE).is_file() or (path / LEGACY_STATE_FILE).is_file()


def save_state(directory: Path, state: dict) -> None:
    """Write `state` into `directory` (a fresh temporary directory): tensors file, then JSON, fsynced."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    document = _encode(state, (), tensors)
    blob = save(tensors)  # bytes: our own write below reports a full disk as OSError
    _write_synced(directory / TENSORS_FILE, blob)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "state": document,
    }
    _write_synced(directory / STATE_FILE, json.dumps(header).encode())


def load_state(directory: Path) -> dict:
    """The state `save_state` wrote; BadInputError if damaged, LegacyCheckpointError for a pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not (directory / STATE_FILE).is_file() and (directory / LEGACY_STATE_FILE).is_file():
        raise LegacyCheckpointError(
            f"{directory}: checkpoint from an older loraxs in pickle format ({LEGACY_STATE_FILE}); "
            f"not loaded for safety (unpickling can run code); start fresh with another --out or "
            f"delete {directory.parent}"
        )
    try:
        header = loads_json((directory / STATE_FILE).read_bytes())
        blob = (directory / TENSORS_FILE).read_bytes()
    except (OSError, ValueError) as error:
        raise BadInputError(f"{directory}: damaged checkpoint ({error})".splitlines()[0]) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or "state" not in header:
        raise BadInputError(f"{directory}: {STATE_FILE} is not a loraxs checkpoint")
    if header.get("version") != VERSION:
        raise BadInputError(
            f"{directory}: checkpoint format version {header.get('version')!r}; this loraxs reads {VERSION}"
        )
    if hashlib.sha256(blob).hexdigest() != header.get("tensors_sha256"):
        raise BadInputError(f"{directory}: damaged checkpoint ({TENSORS_FILE} fails its sha256 check)")
    try:
        tensors = load(blob)
        return _decode(header["state"], tensors)
    except (SafetensorError, KeyError, TypeError, ValueError) as error:
        raise BadInputError(f"{directory}: damaged checkpoint ({error})".splitlines()[0]) from None


def rng_state() -> dict:
    """The random generators training draws from: torch (CPU, every CUDA device) and python."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Plain values <-> JSON + tensors


def _encode(value, path: tuple[str, ...], tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        key = "/".join(path) or "tensor"
        while key in tensors:  # e.g. int key 0 and str key "0" in one dict
            key += "+"
        # A private contiguous copy: safetensors refuses tensors that share memory.
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in value)
        if plain:
            return {k: _encode(v, (*path, k), tensors) for k, v in value.items()}
        return {
            _ITEMS: [[_encode(k, (), {}), _encode(v, (*path, str(k)), tensors)] for k, v in value.items()]
        }
    raise TypeError(f"checkpoint value of type {type(value).__name__} at {'/'.join(path)} is not storable")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == _TENSOR:
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors) for v in inner)
        if tag == _ITEMS:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key):
    if isinstance(key, (list, dict, torch.Tensor)):
        raise TypeError(f"unusable dict key {key!r}")
    return key


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
