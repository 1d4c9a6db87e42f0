"""Preference tuning (`train --task preference`): DPO with the base model as its own reference.

Rows, as TRL's preference datasets:

    {"prompt", "chosen", "rejected"}      texts
    {"chosen", "rejected"}                texts with an implicit prompt: their common beginning
    the same with lists of messages       the conversational form: "chosen" and "rejected" hold the
                                          answer turn(s), "prompt" the conversation before them; without
                                          "prompt", whole conversations whose common first turns are it

Tokenised as TRL 1.16's DPOTrainer does (`_prepare_dataset`, `DataCollatorForPreference`): a text pair
gets the end-of-sequence token appended to "chosen" and "rejected" (unless they end with it), then
prompt, prompt + chosen and prompt + rejected are tokenised whole (a chat by its template, the prompt with
the generation prompt); the completion starts where the prompt's tokens and the full sequence's diverge,
and a sequence longer than --max-length is cut at its end. One Example holds the pair (the chosen
sequence in `input_ids`/`labels`, the rejected one in `rejected_ids`/`rejected_labels`), so a pair never
splits across micro-batches or processes; `collate_pairs` puts the chosen sequences first and the
rejected ones after them, one forward for both, as TRL does.

The loss is DPO's sigmoid loss (Rafailov et al. 2023; TRL's loss_type="sigmoid", label smoothing 0):

    loss   = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    reward = beta * (pi - ref)           accuracy: reward_c > reward_r      margin: reward_c - reward_r

with pi / ref the summed log-probabilities of a completion's tokens under the policy (base + adapter)
and the reference, averaged over pairs. The reference is the base itself: every LoRA-XS layer switched
off (layer.adapters_disabled), which is exact and needs no second copy of the model. It is computed in
the same step, in a forward without gradients before the policy's: with one epoch that is as many
forwards as caching it up front (TRL's precompute_ref_log_probs), it needs no state in checkpoints and
works with --streaming and every distribution mode, and a forward without gradients frees its
activations as it goes, so the step's peak memory stays the policy pass's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Example, Row, _chat_template, _render
from .errors import BadInputError
from .layer import adapters_disabled

PREFERENCE = "preference"
PAIR_FIELDS = ("chosen", "rejected")
DEFAULT_BETA = 0.1  # TRL's DPOConfig.beta
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def is_pair_row(fields: dict) -> bool:
    return any(name in fields for name in PAIR_FIELDS)


# ----------------------------------------------------------------------------------------------
# Rows and tokenisation


def encode_pair(row: Row, tokenizer, max_length: int) -> Example:
    """The pair of a row as one Example (chosen: input_ids/labels, rejected: rejected_ids/rejected_labels),
    with IGNORE_INDEX on the prompt's tokens."""
    prompt, chosen, rejected = pair_parts(row)
    if isinstance(chosen, list):
        prompt_ids = _chat_ids(row, tokenizer, prompt, add_generation_prompt=True)
        chosen_ids = _chat_ids(row, tokenizer, prompt + chosen)
        rejected_ids = _chat_ids(row, tokenizer, prompt + rejected)
    else:
        eos = tokenizer.eos_token
        if eos:
            chosen = chosen if chosen.endswith(eos) else chosen + eos
            rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = list(tokenizer(text=prompt)["input_ids"])
        chosen_ids = list(tokenizer(text=prompt + chosen)["input_ids"])
        rejected_ids = list(tokenizer(text=prompt + rejected)["input_ids"])
    # TRL's rule: the completion starts where the prompt's tokens and the whole sequence's diverge (a
    # token merging across the boundary, a template rendering the prompt alone differently).
    start = min(_common_prefix(prompt_ids, chosen_ids), _common_prefix(prompt_ids, rejected_ids))
    if start >= max_length:
        raise BadInputError(f"{row.where}: the prompt fills all {max_length} tokens; raise --max-length")
    for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        if len(ids) <= start:
            raise BadInputError(f"{row.where}: the {name} answer has no tokens after the prompt")
    chosen_ids, rejected_ids = chosen_ids[:max_length], rejected_ids[:max_length]
    return Example(
        chosen_ids,
        labels=[IGNORE_INDEX] * start + chosen_ids[start:],
        rejected_ids=rejected_ids,
        rejected_labels=[IGNORE_INDEX] * start + rejected_ids[start:],
    )


def pair_parts(row: Row) -> tuple[str | list, str | list, str | list]:
    """(prompt, chosen, rejected) of a row: three texts, or three lists of messages (validated); an
    implicit prompt is taken out of chosen and rejected."""
    fields, where = row.fields, row.where
    for name in PAIR_FIELDS:
        if fields.get(name) in (None, "", []):
            present = ", ".join(sorted(fields)) or "none"
            raise BadInputError(
                f"{where}: preference rows need 'chosen' and 'rejected' (and 'prompt'); missing {name!r} "
                f"(fields present: {present})"
            )
    chosen, rejected, prompt = fields["chosen"], fields["rejected"], fields.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            return _implicit_prompt(row, chosen, rejected)
        if not isinstance(prompt, str):
            raise BadInputError(
                f"{where}: 'prompt' must be a string when 'chosen' and 'rejected' are, got "
                f"{type(prompt).__name__} (or make all three lists of messages)"
            )
        return prompt, chosen, rejected
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = _messages(row, "chosen", chosen), _messages(row, "rejected", rejected)
        if prompt is None:
            prompt, chosen, rejected = _implicit_prompt(row, chosen, rejected)
            if not prompt:
                raise BadInputError(
                    f"{where}: 'chosen' and 'rejected' differ from their first message: give the "
                    "conversation before the answers as 'prompt'"
                )
            return prompt, chosen, rejected
        if not isinstance(prompt, list):
            raise BadInputError(
                f"{where}: 'prompt' must be a list of messages when 'chosen' and 'rejected' are, got "
                f"{type(prompt).__name__}"
            )
        return _messages(row, "prompt", prompt), chosen, rejected
    raise BadInputError(
        f"{where}: 'chosen' and 'rejected' must both be strings or both lists of messages, got "
        f"{type(chosen).__name__} and {type(rejected).__name__}"
    )


def _implicit_prompt(row: Row, chosen, rejected):
    """trl.extract_prompt: the prompt is the common beginning of chosen and rejected (characters, or
    whole messages), less a space before the point where they differ. Kept here (a few lines) rather
    than imported: trl is not a dependency of loraxs."""
    if chosen == rejected:
        raise BadInputError(f"{row.where}: 'chosen' and 'rejected' are the same")
    size = min(len(chosen), len(rejected))
    index = size - 1  # TRL's loop leaves the index there when one is the beginning of the other
    for i in range(size):
        if chosen[i] != rejected[i]:
            index = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:index], chosen[index:], rejected[index:]


def _messages(row: Row, name: str, value: list) -> list[dict]:
    if not value:
        raise BadInputError(f"{row.where}: '{name}' is an empty list of messages")
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise BadInputError(
                f"{row.where}: {name} message {number} must be a {{role, content}} object, "
                f"got {type(message).__name__}"
            )
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise BadInputError(f"{row.where}: {name} message {number} has no 'role' (a string such as user)")
        if not isinstance(message.get("content"), str):
            got = "nothing" if message.get("content") is None else type(message["content"]).__name__
            raise BadInputError(
                f"{row.where}: {name} message {number}: 'content' must be a string, got {got}"
            )
    return value


def _chat_ids(row: Row, tokenizer, messages: list[dict], **kwargs) -> list[int]:
    if _chat_template(tokenizer) is None:
        raise BadInputError(
            f"{row.where}: this model's tokenizer has no chat template; give prompt, chosen and "
            "rejected as texts"
        )
    return list(_render(row, tokenizer, messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def _common_prefix(ids: list[int], other: list[int]) -> int:
    size = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        size += 1
    return size


def collate_pairs(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of 2 N sequences: the N chosen ones, then the N rejected ones (labels:
    IGNORE_INDEX outside the completions)."""
    sequences = [(e.input_ids, e.labels) for e in examples]
    sequences += [(e.rejected_ids, e.rejected_labels) for e in examples]
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (tokens, targets) in enumerate(sequences):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
        labels[i, : len(targets)] = torch.tensor(targets)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------------
# The loss


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each sequence's labelled tokens (float32, one per row): token t + 1
    under the logits at t, as objective.loss_sum shifts them (the same cross-entropy, unreduced)."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    per_token = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return -per_token.view(targets.shape).sum(-1)


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from the summed log-probabilities: TRL's
    sigmoid loss and its reward definitions (rewards detached)."""
    chosen_ratios, rejected_ratios = chosen - ref_chosen, rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratios - rejected_ratios))
    return losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


class PairStats:
    """Sums over pairs of the DPO loss and the reward metrics; `metrics` gives their means (TRL's names).
    `values` / `from_values` carry the sums across processes (Dist.sum)."""

    KEYS = ("loss", *METRICS, "pairs")

    def __init__(self, values: Sequence[float] | None = None):
        self.values = list(values) if values is not None else [0.0] * len(self.KEYS)

    def add(self, losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        parts = (
            losses.detach(),
            chosen,
            rejected,
            (chosen > rejected).float(),  # TRL: a tie is not a correct preference
            chosen - rejected,
        )
        for i, part in enumerate(parts):
            self.values[i] += float(part.double().sum())
        self.values[-1] += losses.numel()

    @property
    def pairs(self) -> int:
        return int(self.values[-1])

    def metrics(self) -> dict[str, float]:
        count = max(self.values[-1], 1)
        return {key: value / count for key, value in zip(self.KEYS[1:-1], self.values[1:-1], strict=True)}


def pair_loss(
    model: torch.nn.Module,
    batch: dict,
    device,
    beta: float,
    autocast: Callable | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The summed DPO loss of a collated batch of pairs (with the policy's gradient) and its parts
    (`dpo_losses`). The reference pass comes first, without gradients and with the adapter off."""
    from .objective import model_inputs

    inputs = model_inputs(batch, device)
    labels = batch["labels"].to(device)
    with torch.no_grad(), adapters_disabled(model), autocast() if autocast else nullcontext():
        reference = sequence_logps(model(**inputs).logits, labels)
    with autocast() if autocast else nullcontext():
        logits = model(**inputs).logits
    policy = sequence_logps(logits, labels)
    del logits
    pairs = policy.shape[0] // 2
    parts = dpo_losses(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], beta)
    return parts[0].sum(), parts


@torch.no_grad()
def evaluate_pairs(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    device,
    beta: float,
    autocast: Callable | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """The mean DPO loss and reward metrics of the pairs (eval mode; batches of similar length)."""
    from .evaluate import by_length
    from .models import evaluating

    stats = PairStats()
    with evaluating(model):
        for chunk in by_length(examples, batch_size):
            _, parts = pair_loss(model, collate_pairs(chunk, pad_id), device, beta, autocast)
            stats.add(*parts)
            if on_batch:
                on_batch(len(chunk))
    return {"loss": stats.values[0] / max(stats.pairs, 1), **stats.metrics(), "examples": len(examples)}
