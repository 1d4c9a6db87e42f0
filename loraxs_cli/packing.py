"""Sample packing (`train --packing`): several causal-lm examples in one row of at most --max-length
tokens, so that a batch holds real tokens instead of padding.

A packed row is a `data.Example` whose `position_ids` restart at 0 with each example. `data.collate`
gives such rows their position ids and no attention mask, and transformers then builds the mask of
each example alone: masking_utils.find_packed_sequence_indices starts a new sequence wherever a position
does not follow the one before it by 1, and packed_sequence_mask_function keeps attention within a
sequence (eager, sdpa and flex attention alike). Flash attention reads packed sequences from the position
ids only in a batch of one row (modeling_flash_attention_utils._is_packed_sequence): `flattened` makes a
micro-batch that row, as transformers' DataCollatorWithFlattening does. Both need the model to run
without a cache (objective.model_inputs), and an architecture that builds its mask another way would
attend across examples: `check_packed_attention` refuses it before training.

The loss: `objective.loss_sum` predicts labels[t] from the tokens before t. The first label of every
packed example is IGNORE_INDEX, so no example is asked for the next one's first token, and the loss terms
of a row are exactly those of its examples unpacked (whose first label never counts either).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import torch

from .data import IGNORE_INDEX, Example
from .errors import BadInputError


def pack(examples: Iterable[Example], max_length: int, window: int | None = None) -> Iterator[Example]:
    """Packed rows of causal-lm `examples`, at most `max_length` tokens each: best-fit decreasing over
    each `window` of examples in turn (None: all of them at once).

    Best-fit decreasing, TRL's default strategy (trl.pack_dataset, "bfd"): the examples longest first,
    each into the row it fills the most, a new row when none has room. It needs no seed (the rows depend
    on the examples alone, so a resumed run packs the same ones) and leaves less padding than greedy
    packing of a shuffled order; the order of training is still the run's seeded permutation of the rows
    (schedule.step_indices). `window` bounds what a stream holds: the rows of one window are yielded
    before the next is read. An example longer than max_length (data.encode cuts them) is a row alone.
    """
    held: list[Example] = []
    for example in examples:
        held.append(example)
        if window and len(held) >= window:
            yield from _best_fit_decreasing(held, max_length)
            held = []
    if held:
        yield from _best_fit_decreasing(held, max_length)


def _best_fit_decreasing(examples: list[Example], max_length: int) -> Iterator[Example]:
    # Rows by the room they have left: `rooms` holds the distinct values (at most max_length of them, so
    # keeping it sorted is cheap), `by_room` the rows with each; the best fit is the least room >= size.
    rows: list[list[Example]] = []
    rooms: list[int] = []
    by_room: dict[int, deque[int]] = {}

    def keep(row: int, room: int) -> None:
        if room <= 0:
            return
        if room not in by_room:
            bisect.insort(rooms, room)
            by_room[room] = deque()
        by_room[room].append(row)

    for example in sorted(examples, key=lambda e: -len(e.input_ids)):  # stable: ties in input order
        size = len(example.input_ids)
        at = bisect.bisect_left(rooms, size)
        if at == len(rooms):
            rows.append([example])
            keep(len(rows) - 1, max_length - size)
            continue
        room = rooms[at]
        row = by_room[room].popleft()  # the earliest row of that room: the same rows on every run
        if not by_room[room]:
            del by_room[room]
            rooms.pop(at)
        rows[row].append(example)
        keep(row, room - size)
    for parts in rows:
        yield packed_row(parts)


def packed_row(parts: Sequence[Example]) -> Example:
    """One row of `parts` (examples or packed rows) one after another, each numbered from 0 and with
    its first label ignored."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for part in parts:
        if part.labels is None:
            raise ValueError("packing is for causal-lm examples (per-token labels)")
        ids += part.input_ids
        labels += [IGNORE_INDEX, *part.labels[1:]]
        positions += part.position_ids if part.position_ids is not None else range(len(part.input_ids))
    return Example(ids, labels=labels, position_ids=positions)


def flattened(examples: Sequence[Example]) -> list[Example]:
    """A micro-batch of packed rows as one row without padding, the layout flash attention reads packed
    sequences from (DataCollatorWithFlattening's)."""
    return [packed_row(examples)] if len(examples) > 1 else list(examples)


def uses_flash_attention(model: torch.nn.Module) -> bool:
    """Whether the model's attention is a flash-attention kernel (flash_attention_2/3, a hub kernel)."""
    return "flash" in str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")


def check_packed_attention(model: torch.nn.Module, device: torch.device, what: str = "the model") -> None:
    """Refuse (BadInputError) a model whose attention crosses packed examples (an architecture whose mask
    is not built by transformers' masking_utils, remote code). Two short examples are run packed twice,
    with two different first examples: where nothing attends across, the second's logits are the same
    numbers (a masked position adds exactly 0, and no other layer mixes tokens), whatever the dtype."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    firsts = [torch.randint(3, vocab, (8,), generator=generator) for _ in range(2)]
    second = torch.randint(3, vocab, (8,), generator=generator)
    positions = torch.cat([torch.arange(8), torch.arange(8)])[None].to(device)

    def second_logits(first: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([first, second])[None].to(device)
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 8:].float().cpu()

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = [second_logits(first) for first in firsts]
    finally:
        model.train(training)
        if callable(getattr(model, "reshard", None)):  # FSDP keeps the weights whole after a forward
            model.reshard()
    if (logits[0] - logits[1]).abs().max() > 1e-4 * logits[0].abs().max():
        kind = "flash attention " if uses_flash_attention(model) else ""
        raise BadInputError(
            f"--packing: {what} lets packed examples attend to each other (its {kind}attention does not "
            "read restarting position ids); train without --packing"
        )
