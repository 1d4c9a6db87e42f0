"""Training and evaluation data: reading files, validating rows, tokenising and collating per task.

Formats: JSONL (one object per line), CSV (header row), Parquet (needs pyarrow), and .txt (plain
text for language modelling). Fields per task:

    causal-lm   {"prompt", "response"}   loss on the response only
                {"messages": [...]}      chat template; loss on the last assistant turn
                {"text"}                 loss on every token (long texts are cut into blocks)
    seq-cls     {"text", "label"} or {"text_a", "text_b", "label"}; label a string or an int
    regression  the same with a float label

Every problem with a row is a BadInputError that names the file and the line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInputError, UsageError

TASKS = ("causal-lm", "seq-cls", "regression")
IGNORE_INDEX = -100
MAX_LINE_BYTES = 64 * 1024 * 1024  # a single row larger than this is not data, it is an accident


@dataclass(frozen=True)
class Row:
    fields: dict
    where: str  # "file:line" for error messages


def check_task(task: str) -> str:
    if task not in TASKS:
        raise UsageError(f"unknown --task {task!r}: use one of {', '.join(TASKS)}")
    return task


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_rows(path: str | Path) -> list[Row]:
    """Every row of a data file, with its location; an empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".csv": _read_csv, ".tsv": _read_csv}
    if suffix == ".parquet":
        rows = _read_parquet(path)
    elif suffix == ".txt":
        rows = _read_text(path)
    elif suffix in readers:
        rows = readers[suffix](path)
    else:
        raise BadInputError(
            f"{path}: unknown data format {suffix or '(none)'}; use .jsonl, .csv, .parquet or .txt"
        )
    if not rows:
        raise BadInputError(f"{path}: no rows")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                raise BadInputError(f"{where}: line longer than {MAX_LINE_BYTES >> 20} MiB")
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as error:
                raise BadInputError(f"{where}: invalid JSON ({error})") from None
            if not isinstance(value, dict):
                raise BadInputError(f"{where}: expected a JSON object, got {type(value).__name__}")
            rows.append(Row(value, where))
    return rows


def _read_csv(path: Path) -> list[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(MAX_LINE_BYTES)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or any(v is None for v in row.values()):
                    raise BadInputError(f"{where}: wrong number of columns (header: {reader.fieldnames})")
                rows.append(Row(dict(row), where))
            return rows
    except UnicodeDecodeError as error:
        raise BadInputError(f"{path}: not UTF-8 text ({error})") from None
    except csv.Error as error:
        raise BadInputError(f"{path}: malformed CSV ({error})") from None


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise BadInputError(f"{path}: unreadable Parquet ({error})".splitlines()[0]) from None
    return [Row(record, f"{path}:row {i + 1}") for i, record in enumerate(records)]


def _read_text(path: Path) -> list[Row]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BadInputError(f"{path}: not UTF-8 text ({error})") from None
    # Paragraphs (blank-line separated) are the documents; tokenisation cuts long ones into blocks.
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    return [Row({"text": b}, f"{path}:paragraph {i + 1}") for i, b in enumerate(blocks)]


# ----------------------------------------------------------------------------------------------
# Labels


def label_names(rows: Sequence[Row], task: str) -> list[str] | None:
    """The label map of a classification set: sorted strings, or "0".."K-1" for integer labels."""
    if task != "seq-cls":
        return None
    values = [_field(row, "label") for row in rows]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise BadInputError(
                f"{rows[values.index(min(values))].where}: negative class index {min(values)}"
            )
        return [str(i) for i in range(max(values) + 1)]
    return sorted({str(v) for v in values})


def _field(row: Row, name: str):
    if name not in row.fields or row.fields[name] is None or row.fields[name] == "":
        present = ", ".join(sorted(row.fields)) or "none"
        raise BadInputError(f"{row.where}: missing field {name!r} (fields present: {present})")
    return row.fields[name]


def _text(row: Row, name: str) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise BadInputError(f"{row.where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _class_index(row: Row, labels: list[str]) -> int:
    value = _field(row, "label")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadInputError(f"{row.where}: label must be a string or an integer, got {value!r}")
    key = str(value)
    if key not in labels:
        raise BadInputError(f"{row.where}: label {value!r} is not one of the model's labels {labels}")
    return labels.index(key)


def _float_label(row: Row) -> float:
    value = _field(row, "label")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{row.where}: regression label must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise BadInputError(f"{row.where}: regression label must be a finite number, got {value!r}")
    return number


# ----------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | None = None  # causal-lm: per-token targets (IGNORE_INDEX = no loss)
    target: float | int | None = None  # seq-cls class index / regression value
    pair: list[int] | None = None  # token_type ids for text pairs (BERT)

    @property
    def num_targets(self) -> int:
        if self.labels is not None:
            return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)
        return 1


def encode(
    rows: Sequence[Row], tokenizer, task: str, *, max_length: int, labels: list[str] | None = None
) -> list[Example]:
    """Tokenise rows for `task`; causal-lm texts longer than max_length become several blocks."""
    check_task(task)
    if task == "causal-lm":
        examples = []
        for row in rows:
            examples.extend(_encode_lm(row, tokenizer, max_length))
        return examples
    return [_encode_cls(row, tokenizer, task, max_length, labels) for row in rows]


def _encode_cls(row: Row, tokenizer, task: str, max_length: int, labels) -> Example:
    if "text_a" in row.fields:
        enc = tokenizer(_text(row, "text_a"), _text(row, "text_b"), truncation=True, max_length=max_length)
    else:
        enc = tokenizer(_text(row, "text"), truncation=True, max_length=max_length)
    target = _class_index(row, labels or []) if task == "seq-cls" else _float_label(row)
    return Example(list(enc["input_ids"]), target=target, pair=enc.get("token_type_ids"))


def _encode_lm(row: Row, tokenizer, max_length: int) -> list[Example]:
    fields = row.fields
    if "messages" in fields:
        prompt_ids, response_ids = _chat_parts(row, tokenizer)
    elif "prompt" in fields or "response" in fields:
        prompt_ids = _prefixed(tokenizer, _text(row, "prompt"))
        response_ids = tokenizer(_text(row, "response"), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, tokenizer.eos_token_id]
    elif "text" in fields:
        ids = _prefixed(tokenizer, _text(row, "text"))
        blocks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
        return [Example(b, labels=list(b)) for b in blocks if len(b) > 1]
    else:
        present = ", ".join(sorted(fields)) or "none"
        raise BadInputError(
            f"{row.where}: causal-lm rows need 'prompt'+'response', 'messages' or 'text' (present: {present})"
        )
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    if all(t == IGNORE_INDEX for t in labels[1:]):
        raise BadInputError(f"{row.where}: the prompt fills all {max_length} tokens; raise --max-length")
    return [Example(ids, labels=labels)]


def _prefixed(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _chat_parts(row: Row, tokenizer) -> tuple[list[int], list[int]]:
    messages = _field(row, "messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadInputError(f"{row.where}: 'messages' must be a non-empty list of {{role, content}} objects")
    if messages[-1].get("role") != "assistant":
        raise BadInputError(f"{row.where}: the last message must be the assistant's answer to learn")
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError(f"{row.where}: this model's tokenizer has no chat template; use prompt/response")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise BadInputError(f"{row.where}: the chat template does not extend the prompt; use prompt/response")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(response_ids)


def prompt_text(row: Row, tokenizer) -> str:
    """The text a model is asked to continue in generation: the prompt, or the chat up to the answer."""
    fields = row.fields
    if "messages" in fields:
        messages = _field(row, "messages")
        if isinstance(messages, list) and messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return _text(row, "prompt")


def reference_answer(row: Row) -> str:
    fields = row.fields
    if "messages" in fields:
        return str(_field(row, "messages")[-1].get("content", ""))
    for name in ("response", "answer"):
        if name in fields:
            return str(fields[name])
    raise BadInputError(f"{row.where}: generation needs a reference 'response' or 'answer'")


# ----------------------------------------------------------------------------------------------
# Batching


def collate(examples: Sequence[Example], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a forward pass with the loss computed by the caller."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples[0].pair is not None:
        types = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            types[i, : len(e.pair)] = torch.tensor(e.pair)
        batch["token_type_ids"] = types
    if task == "causal-lm":
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, e in enumerate(examples):
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
    elif task == "seq-cls":
        batch["labels"] = torch.tensor([e.target for e in examples], dtype=torch.long)
    else:
        batch["labels"] = torch.tensor([e.target for e in examples], dtype=torch.float32)
    return batch


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def stratified_split(
    rows: Sequence[Row], fraction: float, seed: int, task: str
) -> tuple[list[Row], list[Row]]:
    """Hold out `fraction` of the rows (stratified by label for classification), reproducibly."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise UsageError(f"--eval-split must be between 0 and 1, got {fraction}")
    stratify = [str(_field(r, "label")) for r in rows] if task == "seq-cls" else None
    try:
        train, held = train_test_split(list(rows), test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as error:
        raise BadInputError(f"cannot split {len(rows)} rows for evaluation: {error}") from None
    return train, held
