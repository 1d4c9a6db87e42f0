"""The tokenisation cache: the examples of a set of rows encoded once, kept under `$LORAXS_HOME/tokenized/`,
so that a rerun or a resumed `train` does not tokenise again.

An entry is one safetensors file (no pickles: nothing loraxs reads is unpickled), named by the sha256 of
everything its examples depend on: the rows themselves (their fields as read and shaped, so the data's
content, the --columns mapping, the layout and the held-out split are all in it), the tokenizer (its
serialised vocabulary, merges, normaliser and pre-tokeniser, its special tokens and chat template), the
task, --max-length and the model's limit, --chat-loss, the label map, the fields of data.Example and the
format version. It is written to a temporary sibling and renamed into place (fsutil.atomic_path); a lock
under `tokenized/.locks/` keeps two processes (torchrun's, or two runs) from encoding the same entry at
once: the second waits, then reads it. Each entry records the sha256 of its tensors: an entry that does
not read back whole (truncated, altered, of another format) is ignored and rewritten, never an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from . import data as datamod
from .data import Example, Row
from .fsutil import atomic_path
from .paths import loraxs_home

FORMAT = 1


def tokenized_root() -> Path:
    return loraxs_home() / "tokenized"


def encode_cached(
    rows: Sequence[Row],
    tokenizer,
    task: str,
    *,
    max_length: int,
    labels: list[str] | None = None,
    chat_loss: str = "all",
) -> list[Example]:
    """data.encode(rows, ...), from the cache when these rows were encoded so before."""

    def encode() -> list[Example]:
        return datamod.encode(
            rows, tokenizer, task, max_length=max_length, labels=labels, chat_loss=chat_loss
        )

    key = entry_key(rows, tokenizer, task, max_length=max_length, labels=labels, chat_loss=chat_loss)
    path = tokenized_root() / f"{key}.safetensors"
    found = read_entry(path, key)
    if found is not None:
        return found
    from .cache import lock_timeout

    try:
        locks = tokenized_root() / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{key}.lock"), timeout=lock_timeout())
        lock.acquire()
    except (OSError, Timeout):  # an unwritable home, or a stuck writer: encode without the cache
        return encode()
    try:
        found = read_entry(path, key)  # the process that held the lock may have written it
        if found is not None:
            return found
        examples = encode()
        write_entry(path, key, examples)
        return examples
    finally:
        lock.release()


def entry_key(rows: Sequence[Row], tokenizer, task: str, *, max_length: int, labels, chat_loss: str) -> str:
    digest = hashlib.sha256()
    settings = {
        "format": FORMAT,
        "example_fields": [f.name for f in dataclasses.fields(Example)],
        "tokenizer": tokenizer_id(tokenizer),
        "task": task,
        "max_length": max_length,
        "model_limit": datamod.token_limit(tokenizer),
        "chat_loss": chat_loss,
        "labels": labels,
        "rows": len(rows),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for row in rows:
        digest.update(b"\n")
        try:
            digest.update(json.dumps(row.fields, sort_keys=True, ensure_ascii=False, default=repr).encode())
        except (TypeError, ValueError):  # keys that do not sort (mixed types): their repr, in order
            digest.update(repr(row.fields).encode())
    return digest.hexdigest()


def tokenizer_id(tokenizer) -> str:
    """sha256 of what the tokenizer does: its whole serialised pipeline (fast tokenizers) or its
    vocabulary, with its class, special tokens, chat template and limit."""
    digest = hashlib.sha256()
    to_str = getattr(getattr(tokenizer, "backend_tokenizer", None), "to_str", None)
    if to_str is not None:
        digest.update(to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    described = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "model_max_length": getattr(tokenizer, "model_max_length", None),
        "padding_side": getattr(tokenizer, "padding_side", None),
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Entries: each Example field a column, lists as one flat int32 tensor and their lengths


def write_entry(path: Path, key: str, examples: list[Example]) -> bool:
    """Write the entry (atomically); False when it cannot be cached (an unwritable home, values
    that do not fit the format): the run goes on without it."""
    from safetensors.torch import save_file

    tensors, layout = {}, {}
    try:
        for f in dataclasses.fields(Example):
            values = [getattr(e, f.name) for e in examples]
            if all(v is None for v in values):
                continue
            if all(isinstance(v, list) for v in values):
                tensors[f.name] = torch.tensor(list(itertools.chain.from_iterable(values)), dtype=torch.int32)
                tensors[f"{f.name}.lengths"] = torch.tensor([len(v) for v in values], dtype=torch.int64)
                layout[f.name] = "list"
            elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                tensors[f.name] = torch.tensor(values, dtype=torch.int64)
                layout[f.name] = "int"
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                tensors[f.name] = torch.tensor(values, dtype=torch.float64)
                layout[f.name] = "float"
            else:
                return False
    except (TypeError, ValueError, RuntimeError, OverflowError):  # a value outside int32 / int64
        return False
    metadata = {
        "format": str(FORMAT),
        "key": key,
        "count": str(len(examples)),
        "layout": json.dumps(layout),
        "sha256": _tensors_sha256(tensors),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except OSError:
        return False
    return True


def read_entry(path: Path, key: str) -> list[Example] | None:
    """The entry's examples, or None when there is none or it does not read back whole."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != str(FORMAT) or metadata.get("key") != key:
            return None
        tensors = load_file(str(path))
        if _tensors_sha256(tensors) != metadata.get("sha256"):
            return None
        count = int(metadata["count"])
        columns = {}
        for name, kind in json.loads(metadata["layout"]).items():
            values = tensors[name].tolist()
            if kind == "list":
                lengths = tensors[f"{name}.lengths"].tolist()
                if len(lengths) != count or sum(lengths) != len(values):
                    return None
                ends = list(itertools.accumulate(lengths))
                values = [values[end - n : end] for end, n in zip(ends, lengths, strict=True)]
            if len(values) != count:
                return None
            columns[name] = values
        return [Example(**{name: column[i] for name, column in columns.items()}) for i in range(count)]
    except Exception:  # a truncated or altered entry, another version's: ignored, then rewritten
        return None


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()
