"""Where rows come from (`--data`, `--eval-data`, `--prompts`), and the one place where rows in the common
layouts become loraxs's fields (data.py tokenises those).

What a source may be (`DataSpec.source`):

    a data file     .jsonl/.json, .csv/.tsv, .parquet, .txt: data.py's readers (errors name file:line)
    an Arrow file   .arrow: what `datasets` writes (save_to_disk's data-*.arrow, its cache files)
    a directory     a `datasets` save_to_disk directory (load_from_disk; a DatasetDict takes the split),
                    or a folder of data files in a hub repository's layout (load_dataset on the folder)
    a hub id        NAME or ORG/NAME (ID[split] names the split): datasets.load_dataset, through the
                    datasets cache (HF_HOME, HF_DATASETS_CACHE; HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)

Every source but a data file needs the `datasets` library (the `data` extra). A row from `datasets` is
named by its dataset, split and row (counted from 1, as lines are): `org/name[train] row 17`,
`DIR[test] row 3`, `FILE.arrow:row 9`.

Layouts, applied to every row of every source (`shaped`), after `--columns` renamed its columns:

    alpaca    instruction (+ input) and output -> prompt and response; the prompt is Stanford Alpaca's
              template (train.py's PROMPT_DICT), with the input section only when the input is not empty
    ShareGPT  conversations (or messages) of {from, value} -> messages of {role, content}
              (human -> user, gpt -> assistant, system, tool ...), a `system` column as the first message
    OpenAI    messages of {role, content}: loraxs's own chat rows, as they are
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import data as datamod
from .data import Row
from .errors import BadInputError, UsageError
from .fsutil import require_regular_file

EXTRA = "loraxs[data]"
# The fields data.py reads: what --columns may rename a column to.
FIELDS = (
    "prompt", "response", "messages", "text", "text_a", "text_b", "label", "answer", "adapter", "chosen",
    "rejected",
)  # fmt: skip
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
ARROW_SUFFIX = ".arrow"
DEFAULT_SPLIT = "train"
# ORG/NAME or NAME, as the Hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_WITH_SPLIT = re.compile(r"(?P<source>.+)\[(?P<split>[A-Za-z0-9_.-]+)\]")
# save_to_disk writes dataset_dict.json (a DatasetDict) or state.json + dataset_info.json (a Dataset).
_DISK_MARKERS = ("dataset_dict.json", "state.json")

ALPACA_PROMPT = {  # Stanford Alpaca's train.py, PROMPT_DICT
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}
# ShareGPT speakers (`from`) and the chat role each is; FastChat's and LLaMA-Factory's names.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool", "function_response": "tool",
}  # fmt: skip


def require_datasets(source: Source | None = None):
    """The `datasets` module, or one line naming the extra to install (a usage error, exit 2)."""
    try:
        import datasets  # optional (the data extra): imported only for a source that needs it
    except ImportError:
        what = "Arrow files, `datasets` directories and hub datasets"
        if source is not None and source.kind == "hub":
            what = f"{source.name}: no such file or directory; a hub dataset id"
        raise UsageError(f"{what} needs the datasets package: pip install '{EXTRA}'") from None
    return datasets


# ----------------------------------------------------------------------------------------------
# What --data names


def parse_columns(text: str | None) -> dict[str, str]:
    """{field: column} of `--columns prompt=instruction,response=output`; a malformed one, or a field
    data.py does not read, is a usage error."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for item in text.split(","):
        target, eq, column = (part.strip() for part in item.partition("="))
        if not (eq and target and column):
            raise UsageError(
                f"--columns {text!r}: write FIELD=COLUMN pairs separated by commas, "
                "e.g. prompt=instruction,response=output"
            )
        if target not in FIELDS:
            raise UsageError(f"--columns: unknown field {target!r}; the fields are {', '.join(FIELDS)}")
        if target in mapping:
            raise UsageError(f"--columns: field {target!r} given twice")
        mapping[target] = column
    return mapping


@dataclass(frozen=True)
class DataSpec:
    """A source of rows and how to read it: the options that go with --data."""

    source: str  # a path or a hub id, optionally ID[split]
    config: str | None = None  # --data-config: a hub dataset's configuration (subset)
    split: str | None = None  # --data-split (default train)
    revision: str | None = None  # --data-revision: a hub dataset's branch, tag or commit
    columns: str | None = None  # --columns FIELD=COLUMN,...
    streaming: bool = False  # rows read as they are needed (train --streaming)
    shuffle_buffer: int = 0  # --streaming: rows shuffled within a buffer of this many (0: in order)
    seed: int = 0  # the seed of that shuffle

    def __post_init__(self) -> None:
        parse_columns(self.columns)  # a malformed --columns is refused before anything is read

    def for_eval(self, source: str | None) -> DataSpec | None:
        """The spec of --eval-data: the same --columns, and the same --data-config and --data-revision
        when it names the same dataset (`ID[validation]`); always read into memory."""
        if source is None:
            return None
        same = _split_suffix(source)[0] == _split_suffix(self.source)[0]
        return DataSpec(
            source,
            config=self.config if same else None,
            revision=self.revision if same else None,
            columns=self.columns,
        )


def as_spec(data: str | DataSpec) -> DataSpec:
    return data if isinstance(data, DataSpec) else DataSpec(str(data))


def _split_suffix(source: str) -> tuple[str, str | None]:
    """(source, split) of `ID[split]`; a path that exists is never cut."""
    match = _WITH_SPLIT.fullmatch(source)
    if match is None or Path(source).expanduser().exists():
        return source, None
    return match["source"], match["split"]


def _looks_like_path(text: str) -> bool:
    suffix = Path(text).suffix.lower()
    return text.startswith(("/", ".", "~")) or suffix in (*FILE_SUFFIXES, ARROW_SUFFIX) or text.count("/") > 1


# ----------------------------------------------------------------------------------------------
# A resolved source


@dataclass
class Source:
    """A source resolved to its kind: file, arrow, disk (save_to_disk), folder (load_dataset on a
    directory of data files) or hub. Datasets are loaded on first use, once."""

    spec: DataSpec
    kind: str
    name: str  # the path or the hub id, without [split]
    split: str | None = None
    _dataset: object = field(default=None, repr=False)
    _content_id: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """How rows name their source: `org/name[train]`, `DIR[test]`, `DIR`, `FILE`."""
        if self.kind in ("file", "arrow"):
            return self.name
        config = f"{self.spec.config}:" if self.spec.config else ""
        return f"{self.name}[{config}{self.split}]" if self.split else self.name

    # ------------------------------------------------------------------------------------------

    def dataset(self):
        """The `datasets` Dataset (or IterableDataset when streaming from the hub or a folder)."""
        if self._dataset is None:
            self._dataset = _load(self)
        return self._dataset

    def iter_raw(self) -> Iterator[Row]:
        """The rows as they are stored, in order, read lazily."""
        if self.kind == "file":
            return datamod.iter_rows(self.name)
        return _dataset_rows(self.dataset(), self)

    def iter_rows(self) -> Iterator[Row]:
        """The rows with --columns applied and the common layouts turned into loraxs's fields."""
        mapping = parse_columns(self.spec.columns)
        if mapping and self.kind != "file":
            _check_columns(self, mapping)
        return (shaped(row, mapping) for row in self.iter_raw())

    def rows(self) -> list[Row]:
        """Every row, in memory; a source without rows is an error."""
        rows = list(self.iter_rows())
        if not rows:
            raise BadInputError(f"{self.label}: no rows")
        return rows

    # ------------------------------------------------------------------------------------------

    def describe(self) -> dict:
        """What the adapter records about its data: the file and its sha256, or the dataset (id, config,
        split, revision, fingerprint)."""
        record: dict = {"kind": self.kind}
        if self.kind in ("file", "arrow"):
            record.update(path=str(self.name), file=Path(self.name).name, sha256=self.content_id())
        else:
            dataset = self.dataset()
            record["id" if self.kind == "hub" else "path"] = self.name
            if self.kind == "hub":
                record.update(config=self._config_name(), revision=self.spec.revision)
            record.update(split=self.split, fingerprint=getattr(dataset, "_fingerprint", None))
        if self.spec.columns:
            record["columns"] = self.spec.columns
        if self.spec.streaming:
            record["streaming"] = True
        return record

    def content_id(self) -> str:
        """sha256 (hex) of what the rows come from: a file's bytes; a dataset's identity (its
        fingerprint, or id + config + split + revision when streamed from the hub)."""
        if self._content_id is None:
            if self.kind in ("file", "arrow"):
                self._content_id = datamod.file_sha256(self.name)
            else:
                record = {k: v for k, v in self.describe().items() if k not in ("columns", "streaming")}
                text = json.dumps(record, sort_keys=True, default=str)
                self._content_id = hashlib.sha256(text.encode()).hexdigest()
        return self._content_id

    def _config_name(self) -> str | None:
        info = getattr(self.dataset(), "info", None)
        return self.spec.config or getattr(info, "config_name", None)


def open_source(data: str | DataSpec) -> Source:
    """Resolve what --data names (nothing is read yet); a missing path is 'no such data file'."""
    spec = as_spec(data)
    name, bracket = _split_suffix(spec.source)
    if bracket and spec.split and bracket != spec.split:
        raise UsageError(f"--data {spec.source} names split {bracket!r} and --data-split {spec.split!r}")
    split = bracket or spec.split
    path = Path(name).expanduser()
    if path.is_dir():
        kind = "disk" if any((path / m).is_file() for m in _DISK_MARKERS) else "folder"
        if kind == "disk" and (spec.config or spec.revision):
            raise UsageError(f"{name}: --data-config and --data-revision are for hub datasets, not this one")
        if kind == "folder" and spec.revision:
            raise UsageError(f"{name}: --data-revision is for hub datasets, not a directory")
        several = kind == "folder" or (path / "dataset_dict.json").is_file()  # a DatasetDict: splits
        return Source(spec, kind, name, split or (DEFAULT_SPLIT if several else None))
    if path.exists() or path.is_symlink() or _looks_like_path(name) or not _HUB_ID.fullmatch(name):
        require_regular_file(path, "data file")  # missing, a FIFO, ...: one line
        kind = "arrow" if path.suffix.lower() == ARROW_SUFFIX else "file"
        given = [flag for flag, v in (("--data-config", spec.config), ("--data-revision", spec.revision),
                                      ("--data-split", split)) if v]  # fmt: skip
        if given:
            raise UsageError(f"{name}: {' and '.join(given)} apply to datasets, not a single file")
        return Source(spec, kind, name)
    return Source(spec, "hub", name, split or DEFAULT_SPLIT)


def read_rows(data: str | DataSpec) -> list[Row]:
    """Every row of a source, shaped (--columns, layouts), in memory."""
    return open_source(data).rows()


def read_limited(data: str | DataSpec, limit: int | None = None) -> list[Row]:
    """The first `limit` rows of a source (every row without one), shaped; none is an error."""
    source = open_source(data)
    if not limit:
        return source.rows()
    rows = list(itertools.islice(source.iter_rows(), limit))
    if not rows:
        raise BadInputError(f"{source.label}: no rows")
    return rows


def content_id(data: str | DataSpec) -> str:
    return open_source(data).content_id()


# ----------------------------------------------------------------------------------------------
# Loading through `datasets`


def _load(source: Source):
    datasets = require_datasets(source)
    spec, name = source.spec, source.name
    try:
        if source.kind == "arrow":
            return datasets.Dataset.from_file(name)
        if source.kind == "disk":
            return _from_disk(datasets, source)
        # folder or hub: load_dataset resolves the builder; a hub id through the datasets cache
        return datasets.load_dataset(
            name,
            name=spec.config,
            split=source.split or DEFAULT_SPLIT,
            revision=spec.revision,
            streaming=spec.streaming,
        )
    except (BadInputError, UsageError):
        raise
    except ConnectionError as error:
        if datasets.config.HF_HUB_OFFLINE:
            raise BadInputError(
                f"{name}: no such file or directory, nor a dataset in the datasets cache "
                f"({datasets.config.HF_DATASETS_CACHE}) while HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set: "
                "unset it to download the dataset, or give a local file or directory"
            ) from None
        raise BadInputError(f"{name}: cannot reach the Hugging Face Hub ({_first_line(error)})") from None
    except Exception as error:  # datasets raises many unrelated types (ValueError, FileNotFoundError, ...)
        hint = "; see --data-config and --data-split" if source.kind in ("hub", "folder") else ""
        raise BadInputError(f"{source.label}: cannot load this dataset: {_first_line(error)}{hint}") from None


def _from_disk(datasets, source: Source):
    loaded = datasets.load_from_disk(source.name)
    if isinstance(loaded, datasets.DatasetDict):
        split = source.split or DEFAULT_SPLIT
        if split not in loaded:
            raise BadInputError(
                f"{source.name}: no split {split!r} in this DatasetDict (splits: {', '.join(loaded)}); "
                "pass --data-split"
            )
        source.split = split
        return loaded[split]
    if source.split and str(loaded.split) != source.split:
        raise BadInputError(
            f"{source.name}: a single Dataset (split {loaded.split or 'unnamed'}), not a DatasetDict: "
            f"leave out --data-split {source.split}"
        )
    return loaded


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _check_columns(source: Source, mapping: dict[str, str]) -> None:
    """--columns names columns the dataset has (when it says which it has)."""
    names = getattr(source.dataset(), "column_names", None)
    if not names:
        return
    for target, column in mapping.items():
        if column not in names:
            raise BadInputError(
                f"{source.label}: --columns {target}={column}: no column {column!r} "
                f"(columns: {', '.join(names)})"
            )


def _dataset_rows(dataset, source: Source) -> Iterator[Row]:
    """Rows of a Dataset or IterableDataset, read a batch at a time; ClassLabel ints become their
    names (-1, datasets' "no label", becomes a missing label)."""
    datasets = require_datasets()
    features = getattr(dataset, "features", None) or {}
    names = {c: f.names for c, f in features.items() if isinstance(f, datasets.ClassLabel)}
    place = f"{source.name}:row" if source.kind == "arrow" else f"{source.label} row"
    number = 0
    for batch in dataset.iter(batch_size=256):
        columns = list(batch)
        for i in range(len(batch[columns[0]]) if columns else 0):
            fields = {c: batch[c][i] for c in columns}
            for column, labels in names.items():
                value = fields.get(column)
                if isinstance(value, int) and 0 <= value < len(labels):
                    fields[column] = labels[value]
                elif value == -1:
                    fields[column] = None
            number += 1
            yield Row(fields, f"{place} {number}")


# ----------------------------------------------------------------------------------------------
# Layouts


def shaped(row: Row, mapping: dict[str, str] | None = None) -> Row:
    """The row with --columns applied (each FIELD takes its COLUMN's value; a missing column is an
    error at the row), then alpaca and ShareGPT rows turned into prompt/response and messages."""
    fields = row.fields
    if mapping:
        missing = next((c for c in mapping.values() if c not in fields), None)
        if missing is not None:
            target = next(t for t, c in mapping.items() if c == missing)
            present = ", ".join(sorted(fields)) or "none"
            raise BadInputError(
                f"{row.where}: --columns {target}={missing}: no column {missing!r} (columns: {present})"
            )
        renamed = {k: v for k, v in fields.items() if k not in mapping.values()}
        renamed.update({target: fields[column] for target, column in mapping.items()})
        fields = renamed
    fields = _layout(fields, row.where)
    return row if fields is row.fields else Row(fields, row.where)


def _layout(fields: dict, where: str) -> dict:
    if "prompt" in fields or "response" in fields:
        return fields
    if isinstance(fields.get("messages"), list):
        messages = _sharegpt_messages(fields["messages"], where, fields.get("system"))
        return fields if messages is None else {**_without(fields, "system"), "messages": messages}
    if isinstance(fields.get("conversations"), list):
        messages = _sharegpt_messages(fields["conversations"], where, fields.get("system"), force=True)
        return {**_without(fields, "conversations", "system"), "messages": messages}
    if "instruction" in fields and "output" in fields and "messages" not in fields:
        return _alpaca(fields, where)
    return fields


def _without(fields: dict, *names: str) -> dict:
    return {k: v for k, v in fields.items() if k not in names}


def _alpaca(fields: dict, where: str) -> dict:
    values = {}
    for name in ("instruction", "input", "output"):
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            got = type(value).__name__
            raise BadInputError(f"{where}: alpaca field {name!r} must be a string, got {got}")
        values[name] = value or ""
    if not values["instruction"]:
        raise BadInputError(f"{where}: alpaca row with an empty 'instruction'")
    template = ALPACA_PROMPT["prompt_input" if values["input"] else "prompt_no_input"]
    prompt = template.format(instruction=values["instruction"], input=values["input"])
    rest = _without(fields, "instruction", "input", "output")
    return {**rest, "prompt": prompt, "response": values["output"]}


def _sharegpt_messages(turns: list, where: str, system, force: bool = False) -> list[dict] | None:
    """ShareGPT turns ({from, value}) as chat messages; None for `messages` that are not ShareGPT's
    (OpenAI-style ones stay as they are, data.chat_messages checks them). `force`: a `conversations`
    column, which is ShareGPT's (OpenAI-style turns in it are taken as they are)."""
    if not force and not any(isinstance(t, dict) and "from" in t and "role" not in t for t in turns):
        return None
    messages = []
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for number, turn in enumerate(turns, start=1):
        if isinstance(turn, dict) and "role" in turn and "from" not in turn:
            messages.append(turn)
            continue
        if not isinstance(turn, dict) or "from" not in turn:
            raise BadInputError(f"{where}: conversation turn {number} must be a {{from, value}} object")
        speaker = turn["from"]
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise BadInputError(
                f"{where}: conversation turn {number}: unknown speaker {speaker!r} "
                f"(ShareGPT's: {', '.join(SHAREGPT_ROLES)})"
            )
        messages.append({"role": role, "content": turn.get("value")})
    return messages


# ----------------------------------------------------------------------------------------------
# Streaming: rows read as training needs them, shuffled within a buffer


@dataclass
class RowStream:
    """The rows of a source, epoch after epoch, read lazily (train --streaming).

    Epoch e's order is the source's order shuffled within a buffer of `spec.shuffle_buffer` rows by a
    generator seeded from (seed, e), or the source's order when the buffer is 0. The order depends on
    nothing else, so a run resumed at (epoch, rows consumed) sees the rows an uninterrupted run sees.
    Hand-rolled rather than datasets' IterableDataset.shuffle: one shuffle for every source (local files
    keep data.py's readers and their file:line), and every row keeps the `where` it was read with."""

    source: Source

    def epoch_rows(self, epoch: int) -> Iterator[Row]:
        rows = self.source.iter_rows()
        spec = self.source.spec
        if spec.shuffle_buffer <= 1:
            return rows
        return _buffer_shuffled(rows, spec.shuffle_buffer, random.Random(spec.seed * 1_000_003 + epoch))

    def label_names(self, task: str) -> list[str] | None:
        """data.label_names of the whole stream, from one pass over its labels (nothing is tokenised)."""
        if task != "seq-cls":
            return None
        distinct: dict[str, Row] = {}
        for row in self.source.iter_rows():
            distinct.setdefault(repr(row.fields.get("label")), row)
        if not distinct:
            raise BadInputError(f"{self.source.label}: no rows")
        return datamod.label_names(list(distinct.values()), task)

    def first_rows(self, count: int) -> list[Row]:
        """The first `count` rows of epoch 0 (task inference, LoRA-SB's gradient sample)."""
        rows = list(itertools.islice(self.epoch_rows(0), count))
        if not rows:
            raise BadInputError(f"{self.source.label}: no rows")
        return rows


def _buffer_shuffled(rows: Iterator[Row], size: int, rng: random.Random) -> Iterator[Row]:
    """Each row in turn enters a buffer of `size` rows and a random row of the buffer leaves it; the
    rest leave in a random order at the end (the classic shuffle buffer, as in tf.data)."""
    buffer: list[Row] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def open_stream(spec: DataSpec) -> RowStream:
    return RowStream(open_source(replace(spec, streaming=True)))
