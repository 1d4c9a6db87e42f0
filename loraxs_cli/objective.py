"""The training objective and the comparison of metrics, shared by training and evaluation.

`loss_sum` is the one definition of "loss" (a training step's and an evaluation's are the same
number); `improves` decides which evaluation is kept as RUN/best. Below both `train` and `evaluate`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

HIGHER_IS_BETTER = {"accuracy", "macro_f1", "mcc", "pearson", "spearman", "exact_match",
                    "rewards/accuracies", "rewards/margins"}  # fmt: skip


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """Summed loss and the number of terms: tokens for causal-lm, examples otherwise (float32)."""
    logits = logits.float()
    if task == "causal-lm":
        shifted, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        count = int((targets != IGNORE_INDEX).sum())
        return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum"), count
    if task == "seq-cls":
        return F.cross_entropy(logits, labels, reduction="sum"), labels.shape[0]
    return F.mse_loss(logits.view(-1), labels.view(-1), reduction="sum"), labels.shape[0]


def model_inputs(batch: dict, device) -> dict:
    """A collated batch without its labels, on `device`: the model's keyword arguments.

    A packed batch (position_ids, no attention_mask) also gets use_cache=False: transformers looks for
    packed examples in the position ids only without a cache (masking_utils._preprocess_mask_arguments),
    and a model in training still makes one when its config says use_cache."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        inputs["use_cache"] = False
    return inputs


def default_metric(task: str) -> str:
    return {"seq-cls": "accuracy", "regression": "pearson"}.get(task, "loss")


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if metric in HIGHER_IS_BETTER else value < best


def improves(metric: str, metrics: dict, best: dict | None) -> bool:
    """Whether eval `metrics` beat the kept `best` (a dict with "value" and "metrics"): by `metric`;
    on a tie, the lower eval loss wins; on a tie of both, the later evaluation (it trained longer)."""
    value, previous = metrics[metric], None if best is None else best["value"]
    if is_better(metric, value, previous):
        return True
    if previous is None or value != previous:
        return False
    loss, best_loss = metrics.get("loss"), (best.get("metrics") or {}).get("loss")
    if metric != "loss" and loss is not None and best_loss is not None and loss != best_loss:
        return loss < best_loss
    return True
