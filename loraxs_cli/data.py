"""Training and evaluation data: reading files, validating rows, tokenising and collating per task.

Formats: JSONL (one object per line), CSV (header row), Parquet (needs pyarrow), and .txt (plain
text for language modelling). Fields per task:

    causal-lm   {"prompt", "response"}   loss on the response only
                {"messages": [...]}      chat template; loss on every assistant turn (or the last:
                                         chat_loss="last"), each with its end-of-turn token
                {"text"}                 loss on every token (long texts are cut into blocks)
    seq-cls     {"text", "label"} or {"text_a", "text_b", "label"}; label a string or an int (1.0 is 1)
    regression  the same with a float label
    preference  {"prompt", "chosen", "rejected"} texts or messages (preference.py: DPO)

Every problem with a row is a BadInputError that names the file and the line. Arrow files, `datasets`
directories, hub dataset ids, --columns and the alpaca / ShareGPT layouts: datasources.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInputError, UsageError
from .fsutil import require_regular_file

TASKS = ("causal-lm", "seq-cls", "regression", "preference")
LM_TASKS = ("causal-lm", "preference")  # trained through the model's language-model head, no task head
CHAT_LOSS = ("all", "last")  # which assistant turns of a chat carry the loss
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


def check_chat_loss(chat_loss: str) -> str:
    if chat_loss not in CHAT_LOSS:
        raise UsageError(f"unknown --chat-loss {chat_loss!r}: use all or last")
    return chat_loss


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(require_regular_file(path, "data file"), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_rows(path: str | Path) -> list[Row]:
    """Every row of a data file, with its location; an empty file is an error."""
    rows = list(iter_rows(path))
    if not rows:
        raise BadInputError(f"{path}: no rows")
    return rows


def iter_rows(path: str | Path) -> Iterator[Row]:
    """The rows of a data file one at a time, read lazily (train --streaming: a file larger than memory)."""
    path = require_regular_file(path, "data file")  # a FIFO would block forever
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".csv": _read_csv, ".tsv": _read_csv,
               ".parquet": _read_parquet, ".txt": _read_text}  # fmt: skip
    if suffix not in readers:
        raise BadInputError(
            f"{path}: unknown data format {suffix or '(none)'}; use .jsonl, .csv, .parquet, .txt or .arrow, "
            "a `datasets` directory or a hub dataset id"
        )
    return readers[suffix](path)


def _read_jsonl(path: Path) -> Iterator[Row]:
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
            except RecursionError:
                raise BadInputError(f"{where}: JSON nested too deeply to be a data row") from None
            if not isinstance(value, dict):
                raise BadInputError(f"{where}: expected a JSON object, got {type(value).__name__}")
            yield Row(value, where)


def _read_csv(path: Path) -> Iterator[Row]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(MAX_LINE_BYTES)
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8" export) is not part of the first column name
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row or any(v is None for v in row.values()):
                    raise BadInputError(f"{where}: wrong number of columns (header: {reader.fieldnames})")
                yield Row(dict(row), where)
    except UnicodeDecodeError as error:
        raise BadInputError(f"{path}: not UTF-8 text ({error})") from None
    except csv.Error as error:
        raise BadInputError(f"{path}: malformed CSV ({error})") from None


def _read_parquet(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    number = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)  # one batch in memory at a time
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield Row(record, f"{path}:row {number}")
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise BadInputError(f"{path}: unreadable Parquet ({error})".splitlines()[0]) from None


def _read_text(path: Path) -> Iterator[Row]:
    # Paragraphs (blank-line separated) are the documents; tokenisation cuts long ones into blocks.
    # Read in pieces, each split where the whole text would be split (at every "\n\n").
    number, carry = 0, ""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            while True:
                piece = handle.read(1 << 20)
                parts = (carry + piece).split("\n\n")
                carry = parts.pop() if piece else ""
                for block in (b.strip() for b in parts + ([carry] if not piece else [])):
                    if block:
                        number += 1
                        yield Row({"text": block}, f"{path}:paragraph {number}")
                if not piece:
                    return
    except UnicodeDecodeError as error:
        raise BadInputError(f"{path}: not UTF-8 text ({error})") from None


# ----------------------------------------------------------------------------------------------
# Labels


MAX_CLASSES = 1 << 16  # integer labels are class indices 0..K-1: a larger index is an id, not a class


def label_names(rows: Sequence[Row], task: str) -> list[str] | None:
    """The label map of a classification set: sorted strings, or "0".."K-1" for integer labels
    (whole-number floats such as 1.0 count as integers: JSON writers and pandas emit them)."""
    if task != "seq-cls":
        return None
    values = [_label_value(row) for row in rows]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise BadInputError(
                f"{rows[values.index(min(values))].where}: negative class index {min(values)}"
            )
        if max(values) >= MAX_CLASSES:
            raise BadInputError(
                f"{rows[values.index(max(values))].where}: class index {max(values)} is too large "
                f"(integer labels are class indices below {MAX_CLASSES}); write the labels as strings"
            )
        return [str(i) for i in range(max(values) + 1)]
    return sorted({str(v) for v in values})


def _label_value(row: Row):
    """A row's label, with a whole-number float (1.0) as the integer it is."""
    value = _field(row, "label")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


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
    value = _label_value(row)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadInputError(f"{row.where}: label must be a string or an integer, got {_shown(value)}")
    key = str(value)
    if key in labels:
        return labels.index(key)
    # GLUE style: an integer (or a CSV/TSV cell holding one) is a class index when the label map
    # names the classes instead (an imported official checkpoint: LABEL_0, LABEL_1, ...)
    index = value if isinstance(value, int) else int(key) if key.isdecimal() and len(key) < 19 else None
    if index is not None and 0 <= index < len(labels):
        return index
    raise BadInputError(f"{row.where}: label {_shown(value)} is not one of the model's labels {labels}")


def _float_label(row: Row) -> float:
    value = _field(row, "label")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    except (TypeError, ValueError):
        raise BadInputError(f"{row.where}: regression label must be a number, got {_shown(value)}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise BadInputError(f"{row.where}: regression label must be a finite number, got {_shown(value)}")
    if abs(number) > FLOAT32_MAX:  # the targets are float32 tensors: it would be an infinite target
        raise BadInputError(f"{row.where}: regression label {_shown(value)} is beyond float32's range")
    return number


FLOAT32_MAX = 3.4028234663852886e38


def _shown(value, limit: int = 40) -> str:
    """repr of a value from a data file, cut short (a row may hold a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


# ----------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | None = None  # causal-lm: per-token targets (IGNORE_INDEX = no loss)
    target: float | int | None = None  # seq-cls class index / regression value
    pair: list[int] | None = None  # token_type ids for text pairs (BERT)
    # A packed row (packing.py, train --packing): several examples, each numbered from 0
    position_ids: list[int] | None = None
    # preference: the rejected sequence of the pair (input_ids and labels hold the chosen one)
    rejected_ids: list[int] | None = None
    rejected_labels: list[int] | None = None

    @property
    def num_targets(self) -> int:
        if self.rejected_ids is not None:  # a pair is one term of the DPO loss
            return 1
        if self.labels is not None:
            return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)
        return 1


def encode(
    rows: Sequence[Row],
    tokenizer,
    task: str,
    *,
    max_length: int,
    labels: list[str] | None = None,
    chat_loss: str = "all",
) -> list[Example]:
    """Tokenise rows for `task`; causal-lm texts longer than max_length become several blocks.
    `chat_loss` picks the assistant turns of a `messages` row that carry the loss: all, or the last."""
    check_task(task)
    check_chat_loss(chat_loss)
    max_length = min(max_length, token_limit(tokenizer) or max_length)
    if task == "preference":
        from .preference import encode_pair

        return [encode_pair(row, tokenizer, max_length) for row in rows]
    if task == "causal-lm":
        examples = []
        for row in rows:
            examples.extend(_encode_lm(row, tokenizer, max_length, chat_loss))
        return examples
    return [_encode_cls(row, tokenizer, task, max_length, labels) for row in rows]


def token_limit(tokenizer) -> int | None:
    """The most tokens the model takes (`models.load_tokenizer` sets the tokenizer's model_max_length
    from the model's position embeddings), or None when the tokenizer names no real limit."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1 << 40 else None


def _encode_cls(row: Row, tokenizer, task: str, max_length: int, labels) -> Example:
    if "text_a" in row.fields:
        enc = tokenizer(_text(row, "text_a"), _text(row, "text_b"), truncation=True, max_length=max_length)
    else:
        enc = tokenizer(_text(row, "text"), truncation=True, max_length=max_length)
    target = _class_index(row, labels or []) if task == "seq-cls" else _float_label(row)
    return Example(list(enc["input_ids"]), target=target, pair=enc.get("token_type_ids"))


def _encode_lm(row: Row, tokenizer, max_length: int, chat_loss: str = "all") -> list[Example]:
    fields = row.fields
    if "messages" in fields:
        ids, labels = chat_example(row, tokenizer, chat_loss)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            raise BadInputError(
                f"{row.where}: no assistant token within the first {max_length} tokens; raise --max-length"
            )
        return [Example(ids, labels=labels)]
    if "prompt" in fields or "response" in fields:
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


# ----------------------------------------------------------------------------------------------
# Chat


def chat_messages(row: Row) -> list[dict]:
    """The validated `messages` of a row: a non-empty list of {"role": str, "content": str} objects."""
    messages = _field(row, "messages")
    if not isinstance(messages, list) or not messages:
        raise BadInputError(f"{row.where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise BadInputError(
                f"{row.where}: message {number} must be a {{role, content}} object, "
                f"got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise BadInputError(f"{row.where}: message {number} has no 'role' (a string such as user)")
        content = message.get("content")
        if not isinstance(content, str):
            got = "nothing" if content is None else type(content).__name__
            raise BadInputError(
                f"{row.where}: message {number} ({role}): 'content' must be a string, got {got}"
            )
    return messages


def chat_example(row: Row, tokenizer, chat_loss: str = "all") -> tuple[list[int], list[int]]:
    """Token ids of a chat and its labels: the assistant turns' tokens (all, or only the last turn's),
    each turn through its end-of-turn token (how the model learns to stop), IGNORE_INDEX elsewhere.

    A template with `{% generation %}` markers labels what the tokenizer's `return_assistant_tokens_mask`
    marks, plus an end-of-sequence token right after a marked span that leaves it out. Any other template
    goes by prefixes: the conversation rendered up to a turn with the generation prompt, and through
    that turn; the characters in between (less trailing whitespace) are the turn, and every token of the
    whole rendered chat that overlaps them is labelled (the same overlap rule as the tokenizer's mask).
    """
    messages = chat_messages(row)
    if messages[-1]["role"] != "assistant":
        raise BadInputError(f"{row.where}: the last message must be the assistant's answer to learn")
    template = _chat_template(tokenizer)
    if template is None:
        raise BadInputError(f"{row.where}: this model's tokenizer has no chat template; use prompt/response")
    if _GENERATION_MARK.search(template):
        return _marked_chat(row, tokenizer, messages, chat_loss)
    return _prefix_chat(row, tokenizer, messages, chat_loss)


_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _chat_template(tokenizer) -> str | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.get_chat_template()
    except (ValueError, TypeError):  # several named templates and no default among them
        return None


def _render(row: Row, tokenizer, messages: list[dict], **kwargs):
    """apply_chat_template, with a template's own refusal (raise_exception) as bad input at the row."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        raise BadInputError(
            f"{row.where}: the chat template rejects this conversation ({error})".splitlines()[0]
        ) from None


def _marked_chat(row: Row, tokenizer, messages, chat_loss: str) -> tuple[list[int], list[int]]:
    encoded = _render(
        row, tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    runs, start = [], None
    for i, flag in enumerate([*mask, 0]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append([start, i])
            start = None
    eos = tokenizer.eos_token_id
    for run in runs:  # a template that marks the content only: the end-of-turn token is learned too
        if eos is not None and run[1] < len(ids) and ids[run[1]] == eos:
            run[1] += 1
    if chat_loss == "last":
        runs = runs[-1:]
    labels = [IGNORE_INDEX] * len(ids)
    for first, stop in runs:
        labels[first:stop] = ids[first:stop]
    return ids, labels


def _prefix_chat(row: Row, tokenizer, messages, chat_loss: str) -> tuple[list[int], list[int]]:
    full = _render(row, tokenizer, messages, tokenize=False)
    learned = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    if chat_loss == "last":
        learned = learned[-1:]
    if not learned:
        raise BadInputError(f"{row.where}: the conversation has no assistant answer to a message before it")
    spans = []
    for i in learned:
        before = _render(row, tokenizer, messages[:i], add_generation_prompt=True, tokenize=False)
        through = _render(row, tokenizer, messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            hint = "; use --chat-loss last" if i != len(messages) - 1 else ""
            raise BadInputError(
                f"{row.where}: the chat template does not render message {i + 1} as an extension of the "
                f"conversation before it{hint}, or prompt/response rows"
            )
        end = len(through.rstrip())
        spans.append((len(before), max(end, len(before))))
    offsets = _offsets(tokenizer, full)
    if offsets is None:  # a tokenizer without offsets: tokenise the pieces one by one
        ids, labels, at = [], [], 0
        for first, stop in spans:
            for text, learn in ((full[at:first], False), (full[first:stop], True)):
                piece = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
                ids.extend(piece)
                labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))
            at = stop
        tail = list(tokenizer(full[at:], add_special_tokens=False)["input_ids"]) if full[at:] else []
        return ids + tail, labels + [IGNORE_INDEX] * len(tail)
    ids, positions = offsets
    labels = [
        token if any(start < stop and end > first for first, stop in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, positions, strict=True)
    ]
    return ids, labels


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    """Token ids of `text` as apply_chat_template makes them (no added special tokens), with the
    character span of each; None for a tokenizer that cannot report spans."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    spans = encoded.get("offset_mapping")
    if spans is None:
        return None
    return list(encoded["input_ids"]), [tuple(s) for s in spans]


def prompt_text(row: Row, tokenizer) -> str:
    """The text a model is asked to continue in generation: the prompt, or the chat up to the answer
    (a chat that ends with an assistant message: that message is the reference answer, not shown)."""
    fields = row.fields
    if "messages" in fields:
        messages = chat_messages(row)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise BadInputError(f"{row.where}: the chat has only the answer; add the message it answers")
        if _chat_template(tokenizer) is None:
            raise BadInputError(f"{row.where}: this model's tokenizer has no chat template; use a prompt")
        return _render(row, tokenizer, messages, add_generation_prompt=True, tokenize=False)
    return _text(row, "prompt")


def check_generation_fits(row: Row, prompt: str, tokenizer, max_new_tokens: int) -> None:
    """Refuse (bad input, at the row) a prompt whose tokens plus `max_new_tokens` pass the model's
    positions (`token_limit`): a model with learned positions would index past them."""
    limit = token_limit(tokenizer)
    if limit is None:
        return
    length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if length + max_new_tokens > limit:
        raise BadInputError(
            f"{row.where}: the prompt has {length} tokens; with --max-new-tokens {max_new_tokens} that "
            f"passes the model's {limit} positions: shorten it or lower --max-new-tokens"
        )


def reference_answer(row: Row) -> str:
    """The answer generation is scored against: the last assistant message, or `response` / `answer`."""
    fields = row.fields
    if "messages" in fields:
        messages = chat_messages(row)
        if messages[-1]["role"] != "assistant":
            raise BadInputError(
                f"{row.where}: generation needs a reference: end the chat with the assistant's answer"
            )
        return messages[-1]["content"]
    for name in ("response", "answer"):
        if name in fields:
            return str(fields[name])
    raise BadInputError(f"{row.where}: generation needs a reference 'response' or 'answer'")


# ----------------------------------------------------------------------------------------------
# Batching


def collate(examples: Sequence[Example], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a forward pass with the loss computed by the caller.

    Packed rows (packing.py) get `position_ids` and no `attention_mask`: transformers' masking_utils then
    finds the examples from the position ids (each restart at 0 begins one) and masks attention across
    them. Their pad tail is numbered from 0 too, a "sequence" of its own that no real token attends to.
    Preference pairs: preference.collate_pairs (the chosen sequences, then the rejected ones)."""
    if task == "preference":
        from .preference import collate_pairs

        return collate_pairs(examples, pad_id)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if any(e.position_ids is not None for e in examples):
        positions = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            size = len(e.input_ids)
            own = e.position_ids if e.position_ids is not None else range(size)
            positions[i, :size] = torch.tensor(list(own))
            positions[i, size:] = torch.arange(width - size)
        batch = {"input_ids": ids, "position_ids": positions}
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
    stratify = [str(_label_value(r)) for r in rows] if task == "seq-cls" else None
    try:
        train, held = train_test_split(list(rows), test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as error:
        raise BadInputError(f"cannot split {len(rows)} rows for evaluation: {error}") from None
    return train, held
