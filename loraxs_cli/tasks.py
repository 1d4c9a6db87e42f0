"""Which task a run or an evaluation is, and whether the base model can do it.

`--task` may be left out: rows with a `label` are classification (`seq-cls`, or `regression` when the
labels are non-integer numbers), rows with `prompt`/`response`, `messages` or `text` are language
modelling (`causal-lm`), rows with `chosen`/`rejected` are preference pairs (`preference`, DPO). A task
given explicitly is checked against the rows, and every task against the model's architecture, from its
config alone (before any weights are read or factors computed): an encoder such as BERT has no causal
language-model head unless its config says `is_decoder`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .data import LM_TASKS, Row, check_task
from .errors import BadInputError
from .preference import is_pair_row

LM_FIELDS = ("prompt", "response", "messages", "text")


def infer_task(rows: Sequence[Row]) -> tuple[str, str]:
    """The task the rows are shaped for, and why (for the message that says so)."""
    if any(is_pair_row(row.fields) for row in rows[:100]):
        return "preference", "rows with chosen/rejected"
    labels = [row.fields["label"] for row in rows if row.fields.get("label") not in (None, "")]
    if not labels:
        kinds = sorted({f for row in rows[:100] for f in LM_FIELDS if f in row.fields}) or ["no label"]
        return "causal-lm", f"rows with {'/'.join(kinds)}"
    if _numeric_non_integer(labels):
        return "regression", "rows with a non-integer numeric label"
    return "seq-cls", "rows with text and label"


def _numeric_non_integer(labels: list) -> bool:
    """Every label is a number and at least one is written as a float (JSON 0.5 or 1.0, CSV "0.5")."""
    floats = False
    for value in labels:
        if isinstance(value, bool):
            return False
        if isinstance(value, float):
            floats = True
        elif isinstance(value, str):
            try:
                float(value)
            except ValueError:
                return False
            floats = floats or any(c in value for c in ".eE")
        elif not isinstance(value, int):
            return False
    return floats


def resolve_task(requested: str | None, rows: Sequence[Row], source: str) -> tuple[str, str | None]:
    """(task, reason): the requested task checked against the rows, or the one they are shaped for.

    `reason` is set when the task was inferred. Rows that cannot serve the requested task are refused
    (BadInputError) with the task they do fit.
    """
    inferred, reason = infer_task(rows)
    if requested is None:
        return inferred, reason
    check_task(requested)
    if (requested == "preference") != (inferred == "preference"):
        first = rows[0]
        if requested == "preference":
            raise BadInputError(
                f"{first.where}: --task preference needs rows with 'chosen' and 'rejected' (and 'prompt'); "
                f"these rows fit --task {inferred} (or leave --task out)"
            )
        raise BadInputError(
            f"{first.where}: the rows are preference pairs (chosen/rejected), which --task {requested} "
            "cannot use: use --task preference (or leave --task out)"
        )
    labelled = next((row for row in rows if row.fields.get("label") not in (None, "")), None)
    if requested == "causal-lm" and labelled is not None:
        raise BadInputError(
            f"{labelled.where}: the rows carry a 'label', which --task causal-lm would ignore; "
            f"use --task {inferred} (or leave --task out to infer it)"
        )
    if requested in ("seq-cls", "regression") and labelled is None:
        first = rows[0]
        if any(f in first.fields for f in LM_FIELDS if f != "text"):
            raise BadInputError(
                f"{first.where}: --task {requested} needs a 'label' in every row; these rows are "
                "language-modelling data: use --task causal-lm (or leave --task out)"
            )
    if requested == "seq-cls" and inferred == "regression" and _has_fraction(rows):
        raise BadInputError(
            f"{source}: the labels are non-integer numbers, which --task seq-cls cannot use as classes; "
            "use --task regression"
        )
    return requested, None


def _has_fraction(rows: Sequence[Row]) -> bool:
    for row in rows:
        value = row.fields.get("label")
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not number.is_integer():
            return True
    return False


def check_architecture(task: str, config, spec: str) -> None:
    """Refuse a task the model cannot do, from its config (exit 3): an encoder-only model (BERT,
    RoBERTa, ...) as a causal LM, or a model type transformers has no head for."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if task in LM_TASKS:
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise BadInputError(
                f"{spec}: a {model_type} model has no causal language-model head; "
                "train it for --task seq-cls or regression (rows of text and label)"
            )
        # Encoder-only types are in the causal-LM mapping (BertLMHeadModel, ...) but work as one only
        # when their config declares a decoder; otherwise attention is bidirectional and the "LM head"
        # is an untrained or masked-LM head: training and perplexity would be meaningless.
        encoder_only = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
            config, "is_encoder_decoder", False
        )
        decoder = bool(getattr(config, "is_decoder", False) or getattr(config, "causal", False))
        if encoder_only and not decoder:
            raise BadInputError(
                f"{spec}: an encoder-only {model_type} model (no is_decoder in its config) cannot be "
                "trained or evaluated as a causal LM; use --task seq-cls or regression with rows of "
                "text and label, or a decoder model for causal-lm"
            )
    elif model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise BadInputError(
            f"{spec}: a {model_type} model has no sequence-classification head for --task {task}"
        )
