"""Which examples each optimizer step trains on. The Trainer and `--lr auto`'s range test ask a source for
`examples_for_step(step)`; a checkpoint records its `position(step)`, and a resumed run `restore`s it.

    InMemoryExamples   the encoded training set; step s takes its slice of a seeded permutation per epoch
                       (schedule.step_indices, grouped by length with --group-by-length)
    StreamedExamples   train --streaming: rows read (datasources.RowStream) and tokenised as the steps
                       need them; every step takes exactly `per_step` examples, across epoch boundaries

A streamed position is (epoch, rows of the epoch used up, examples already taken from the next row: a
long text becomes several examples). Resuming re-opens the epoch's stream, passes over the used rows
without tokenising them, and re-encodes only the row that was partly used, so the resumed run trains on
exactly the examples an uninterrupted run would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from .. import data as datamod
from ..errors import BadInputError
from .schedule import data_position, step_indices


class InMemoryExamples:
    def __init__(self, examples: list, per_step: int, seed: int, grouping: dict | None = None):
        self.examples, self.per_step, self.seed = examples, per_step, seed
        self.grouping = grouping or {}

    def examples_for_step(self, step: int) -> list:
        indices = step_indices(step, len(self.examples), self.per_step, self.seed, **self.grouping)
        return [self.examples[i] for i in indices]

    def position(self, step: int) -> dict:
        return data_position(step, self.per_step, len(self.examples))

    def restore(self, position: dict | None, step: int) -> None:
        """Nothing to do: step s's examples depend on s alone."""

    def epoch(self, step: int) -> float:
        return step * self.per_step / len(self.examples)


class StreamedExamples:
    def __init__(self, stream, encode_row: Callable[[datamod.Row], list], per_step: int):
        self.stream, self.encode_row, self.per_step = stream, encode_row, per_step
        self.next_step = 0
        self._open(0)
        # The position at the start of each step not yet finished, so that a checkpoint written when a
        # step is interrupted (Ctrl-C during its passes, or its tokenisation) records where it began.
        self.marks = {0: self._state()}

    def _state(self) -> tuple[int, int, int]:
        return self.epoch_number, self.rows_done, self.taken

    def _open(self, epoch: int) -> None:
        self.epoch_number, self.rows_done, self.pending, self.taken = epoch, 0, [], 0
        self.examples_in_epoch = 0
        self.rows = self.stream.epoch_rows(epoch)

    def examples_for_step(self, step: int) -> list:
        if step != self.next_step:  # a stream is read in order; restore() moves it
            raise RuntimeError(f"streamed examples asked for step {step}, at step {self.next_step}")
        out: list = []
        while len(out) < self.per_step:
            if self.taken < len(self.pending):
                more = self.pending[self.taken : self.taken + self.per_step - len(out)]
                out.extend(more)
                self.taken += len(more)
                if self.taken == len(self.pending):
                    self.rows_done, self.pending, self.taken = self.rows_done + 1, [], 0
                continue
            row = next(self.rows, None)
            if row is None:
                if not self.examples_in_epoch:
                    raise BadInputError(f"{self.stream.source.label}: no usable training examples")
                self._open(self.epoch_number + 1)
                continue
            self.pending, self.taken = self.encode_row(row), 0
            self.examples_in_epoch += len(self.pending)
            if not self.pending:  # a row that makes no example (a one-token text)
                self.rows_done += 1
        self.next_step += 1
        self.marks = {step: self.marks[step], step + 1: self._state()}
        return out

    def position(self, step: int) -> dict:
        """Where step `step` begins (steps before it are done): the epoch, the rows of it used up and
        the examples taken from the next one."""
        epoch, rows, taken = self.marks[step]
        return {
            "streaming": True,
            "epoch": epoch,
            "rows": rows,
            "taken": taken,
            "examples_per_step": self.per_step,
        }

    def restore(self, position: dict | None, step: int) -> None:
        """Continue after `step` steps from the checkpoint's position: the used rows are passed over,
        not tokenised; the partly used one is encoded again and its taken examples dropped."""
        if not position or not position.get("streaming"):
            raise BadInputError("this checkpoint has no stream position; it was not written by --streaming")
        self._open(int(position["epoch"]))
        self.rows_done = int(position["rows"])
        skipped = sum(1 for _ in itertools.islice(self.rows, self.rows_done))
        if skipped < self.rows_done:
            raise BadInputError(
                f"{self.stream.source.label}: the checkpoint's position (epoch {self.epoch_number}, row "
                f"{self.rows_done}) is past the end of the data; has it changed?"
            )
        self.examples_in_epoch = 1  # the epoch gave examples before the interruption
        taken = int(position.get("taken", 0))
        if taken:
            row = next(self.rows, None)
            self.pending = self.encode_row(row) if row is not None else []
            if taken >= len(self.pending):
                raise BadInputError(
                    f"{self.stream.source.label}: the checkpoint's position (epoch {self.epoch_number}, "
                    f"row {self.rows_done + 1}, example {taken + 1}) does not fit the data; has it changed?"
                )
            self.taken = taken
        self.next_step = step
        self.marks = {step: self._state()}

    def epoch(self, step: int) -> float:
        return self.epoch_number


def example_source(prep, per_step: int, grouping: dict | None = None):
    """The run's example source: streamed (prep.stream, --streaming) or the encoded set (prep.train)."""
    config = prep.config
    if getattr(prep, "stream", None) is None:
        return InMemoryExamples(prep.train, per_step, config.seed, grouping)

    def encode_row(row) -> list:
        return datamod.encode(
            [row], prep.tokenizer, config.task, max_length=config.max_length, labels=prep.labels,
            chat_loss=config.chat_loss,
        )  # fmt: skip

    return StreamedExamples(prep.stream, encode_row, per_step)
