"""Metrics and generation: loss/perplexity, classification and regression scores, exact match.

Scores come from scikit-learn and scipy; this module only gathers predictions. The loss is
objective.loss_sum, the one training uses, so that "eval loss" means the same thing everywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

from . import data as datamod
from .adapter import apply_adapter
from .data import Example, collate
from .datasources import DataSpec, read_limited
from .devices import parse_device
from .errors import IncompatibleError, UsageError
from .generate import generate_batched
from .initialize import describe_base
from .layer import remove
from .models import backbone, evaluating, head_kwargs, load_model, load_tokenizer
from .multi import group_by_factors, load_multi
from .objective import loss_sum, model_inputs
from .preference import DEFAULT_BETA, PREFERENCE, evaluate_pairs
from .quantize import require_backend
from .sources import check_bases, load_adapters
from .tasks import check_architecture, resolve_task

# The last number in a text, or what follows a "####" marker (GSM8K style) when there is one.
MARKER_PATTERN = r"####\s*(-?[\d,]*\.?\d+)"
NUMBER_PATTERN = r"-?\d[\d,]*\.?\d*|-?\.\d+"


def by_length(examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
    """Batches of similar length (less padding); metrics do not depend on order."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def evaluate_examples(
    model: torch.nn.Module,
    examples: Sequence[Example],
    task: str,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    autocast: Callable | None = None,
    on_batch: Callable[[int], None] | None = None,
    beta: float = DEFAULT_BETA,
) -> dict[str, float]:
    """Loss and perplexity (causal-lm); accuracy, macro-F1, MCC (seq-cls); correlations (regression);
    the DPO loss and rewards at `beta` (preference: preference.evaluate_pairs)."""
    if task == PREFERENCE:
        return evaluate_pairs(
            model, examples, batch_size=batch_size, pad_id=pad_id, device=device, beta=beta,
            autocast=autocast, on_batch=on_batch,
        )  # fmt: skip
    scores = Accumulator(task)
    with evaluating(model):
        for chunk in by_length(examples, batch_size):
            batch = collate(chunk, pad_id, task)
            with autocast() if autocast else nullcontext():
                logits = model(**model_inputs(batch, device)).logits
            scores.add(logits, batch["labels"].to(logits.device))
            if on_batch:
                on_batch(len(chunk))
    return scores.metrics(len(examples))


@dataclass
class Accumulator:
    """The summed loss and the predictions of one model (or of one adapter in a stacked pass) over
    the batches of an evaluation; `metrics` turns them into the scores of the task."""

    task: str
    total: float = 0.0
    count: int = 0
    predictions: list = field(default_factory=list)
    targets: list = field(default_factory=list)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        summed, count = loss_sum(logits, labels, self.task)
        self.total, self.count = self.total + float(summed), self.count + count
        if self.task == "seq-cls":
            self.predictions += logits.argmax(-1).tolist()
            self.targets += labels.tolist()
        elif self.task == "regression":
            self.predictions += logits.float().view(-1).tolist()
            self.targets += labels.tolist()

    def metrics(self, examples: int) -> dict:
        loss = self.total / max(self.count, 1)
        metrics = {"loss": loss, "examples": examples}
        if self.task == "causal-lm":
            metrics.update(perplexity=math.exp(min(loss, 700)), tokens=self.count)
        elif self.task == "seq-cls":
            metrics.update(classification_scores(self.targets, self.predictions))
        else:
            metrics.update(regression_scores(self.targets, self.predictions))
        return metrics


def classification_scores(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(targets, predictions)),
        "macro_f1": float(f1_score(targets, predictions, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(targets, predictions)),
    }


def regression_scores(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    constant = len(set(predictions)) < 2 or len(set(targets)) < 2
    return {
        "pearson": float("nan") if constant else float(pearsonr(targets, predictions)[0]),
        "spearman": float("nan") if constant else float(spearmanr(targets, predictions)[0]),
        "mse": float(mean_squared_error(targets, predictions)),
    }


# ----------------------------------------------------------------------------------------------
# Generation


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The final answer in a generated text: the first group of `pattern` (its last match), or by
    default what follows "####" if present, else the last number. Numbers lose thousands separators."""
    if pattern:
        found = re.findall(pattern, text)
        if not found:
            return None
        last = found[-1]
        return (last if isinstance(last, str) else last[0]).strip()
    marker = re.findall(MARKER_PATTERN, text)
    numbers = marker or re.findall(NUMBER_PATTERN, text)
    return _normalise_number(numbers[-1]) if numbers else None


def _normalise_number(value: str) -> str:
    value = value.replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else repr(number)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Batched greedy decoding with left padding and the KV cache (generate.generate_batched, the one
    generation loop); returns only the new text, in prompt order."""
    outputs = [""] * len(prompts)
    generated = generate_batched(
        model, tokenizer, prompts, [-1] * len(prompts), None,
        max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
    )  # fmt: skip
    for position, text in generated:
        outputs[position] = text
        if on_batch:
            on_batch(1)
    return outputs


def exact_match(predicted: Sequence[str], references: Sequence[str], pattern: str | None = None) -> float:
    """Share of generations whose extracted final answer equals the reference's."""
    got = [str(extract_answer(p, pattern)) for p in predicted]
    want = [str(extract_answer(r, pattern) or r.strip()) for r in references]
    return float(accuracy_score(want, got)) if want else float("nan")


# ----------------------------------------------------------------------------------------------
# The `eval` command's core: one base, zero or more adapters, one result row each


@dataclass
class EvalRequest:
    model: str
    data: str
    adapters: list[str] = field(default_factory=list)
    task: str | None = None  # default: the adapters' task, else inferred from the rows (tasks.py)
    batch_size: int = 16
    max_length: int = 512
    generate: bool = False
    max_new_tokens: int = 64
    answer_regex: str | None = None
    limit: int | None = None
    device: str | None = None
    dtype: str = "auto"
    seed: int = 0
    quantize: str | None = None  # int8 | nf4: the base's linear layers quantized (quantize.py)
    beta: float | None = None  # preference: DPO's beta; default the adapter's (training.beta), else 0.1
    # How --data is read when it is a dataset (datasources.py), and --columns FIELD=COLUMN
    data_config: str | None = None
    data_split: str | None = None
    data_revision: str | None = None
    columns: str | None = None

    def data_spec(self) -> DataSpec:
        return DataSpec(self.data, self.data_config, self.data_split, self.data_revision, self.columns)

    def __post_init__(self) -> None:
        """Refuse a request no evaluation can run (a usage error, before anything is read)."""
        self.data_spec()  # a malformed --columns
        if self.quantize is not None:  # an unknown kind, or bitsandbytes missing
            require_backend(self.quantize)
        counts = {"--batch-size": self.batch_size, "--max-length": self.max_length,
                  "--max-new-tokens": self.max_new_tokens, "--limit": self.limit}  # fmt: skip
        for flag, value in counts.items():
            if value is not None and value <= 0:
                raise UsageError(f"{flag} must be positive, got {value}")
        if self.answer_regex:
            try:
                re.compile(self.answer_regex)
            except re.error as error:
                raise UsageError(f"--answer-regex is not a valid regex: {error}") from None


def run_eval(request: EvalRequest, on_start=None, on_batch=None) -> list[dict]:
    """Evaluate the base model (no adapters) or each adapter (any spec, sources.py: a pack stands for
    all its members) on the same data; one dict per row."""
    base = describe_base(request.model, dtype=request.dtype)
    # Names need not be unique: a run's adapter/ and best/ are compared side by side.
    _, adapters = load_adapters(request.adapters, unique=False)
    check_bases(adapters, base, request.model)
    rows = read_limited(request.data_spec(), request.limit)
    task = _eval_task(request, adapters, rows)
    check_architecture(task, base.config, request.model)
    labels = next((a.config.labels for a in adapters if a.config.labels), None) or datamod.label_names(
        rows, task
    )
    tokenizer = load_tokenizer(base.resolved)
    device = parse_device(request.device)
    torch.manual_seed(request.seed)  # the untrained head of a base-model classification run
    kwargs = head_kwargs(task, labels)
    model = load_model(base.resolved, dtype=request.dtype, device=device, quantize=request.quantize, **kwargs)
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    measure = _generation_measure(request, rows, tokenizer) if request.generate else None
    if measure is None:
        examples = datamod.encode(rows, tokenizer, task, max_length=request.max_length, labels=labels)
    units = len(rows) if request.generate else len(examples)
    if on_start:
        on_start(units * max(len(adapters), 1))
    if len(adapters) > 1 and task != PREFERENCE:  # all adapters in one batched pass per factor set
        run = _stacked_measure(request, rows, tokenizer, task) if measure else None
        if run is None:
            pad_id = datamod.pad_id_of(tokenizer)

            def run(model, multi, device, on_batch):
                return evaluate_stacked(model, multi, examples, task, batch_size=request.batch_size,
                                        pad_id=pad_id, device=device, on_batch=on_batch)  # fmt: skip

        return _run_stacked(model, adapters, task, device, run, on_batch)
    results = []
    for adapter in adapters or [None]:
        if adapter is not None:
            apply_adapter(model, adapter)
        if measure is not None:
            metrics = measure(model, device, on_batch)
        else:
            metrics = evaluate_examples(
                model,
                examples,
                task,
                batch_size=request.batch_size,
                pad_id=datamod.pad_id_of(tokenizer),
                device=device,
                on_batch=on_batch,
                beta=_beta(request, adapter),
            )
        results.append({"adapter": str(adapter.path) if adapter else None, "task": task, **metrics})
        if adapter is not None:
            remove(backbone(model))
    return results


def _beta(request: EvalRequest, adapter) -> float:
    """DPO's beta of a preference evaluation: --beta, else the one the adapter was trained with."""
    if request.beta is not None:
        return request.beta
    trained = ((adapter.config.extra if adapter is not None else {}).get("training") or {}).get("beta")
    return float(trained) if isinstance(trained, (int, float)) else DEFAULT_BETA


def _eval_task(request: EvalRequest, adapters, rows) -> str:
    """--task, else the adapters' task, else the one the rows are shaped for; checked against the rows."""
    tasks = {a.config.task for a in adapters if a.config.task}
    if len(tasks) > 1:
        raise IncompatibleError(f"the adapters were trained for different tasks ({', '.join(sorted(tasks))})")
    trained = next(iter(tasks), None)
    if request.task and trained and request.task != trained:
        raise IncompatibleError(f"--task {request.task} does not match the adapter's task {trained}")
    return resolve_task(request.task or trained, rows, request.data)[0]


def _generation_prompts(request: EvalRequest, rows, tokenizer) -> list[str]:
    """Each row's prompt; one that with --max-new-tokens passes the model's positions is bad input."""
    prompts = [datamod.prompt_text(row, tokenizer) for row in rows]
    for row, prompt in zip(rows, prompts, strict=True):
        datamod.check_generation_fits(row, prompt, tokenizer, request.max_new_tokens)
    return prompts


def _generation_measure(request: EvalRequest, rows, tokenizer):
    prompts = _generation_prompts(request, rows, tokenizer)
    references = [datamod.reference_answer(row) for row in rows]

    def measure(model, device, on_batch) -> dict:
        predicted = generate_texts(
            model,
            tokenizer,
            prompts,
            max_new_tokens=request.max_new_tokens,
            batch_size=request.batch_size,
            device=device,
            on_batch=on_batch,
        )
        return {
            "exact_match": exact_match(predicted, references, request.answer_regex),
            "examples": len(rows),
            "samples": [
                {"prompt": p, "output": o, "reference": r}
                for p, o, r in zip(prompts[:3], predicted[:3], references[:3], strict=True)
            ],
        }

    return measure


# ----------------------------------------------------------------------------------------------
# Several adapters in one batched pass (multi.py): every example is replicated once per adapter


def _run_stacked(model, adapters, task: str, device, run, on_batch) -> list[dict]:
    """One pass per factor set over all its adapters; one result row per adapter, in request order."""
    names = [str(a.path) for a in adapters]
    results: list[dict] = [{}] * len(adapters)
    for group in group_by_factors(adapters):
        multi = load_multi(model, [adapters[i] for i in group], [names[i] for i in group])
        try:
            measured = run(model, multi, device, on_batch)
        finally:
            multi.remove()
        for i, metrics in zip(group, measured, strict=True):
            results[i] = {"adapter": names[i], "task": task, **metrics}
    return results


@torch.no_grad()
def evaluate_stacked(
    model, multi, examples: Sequence[Example], task: str, *, batch_size: int, pad_id: int, device,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:  # fmt: skip
    """evaluate_examples for every adapter of `multi` at once: about batch_size rows per forward,
    each example repeated per adapter (adapter-major); the metrics of each adapter as if alone."""
    n = len(multi.names)
    per_chunk = max(1, batch_size // n)
    scores = [Accumulator(task) for _ in range(n)]
    with evaluating(model):
        for chunk in by_length(examples, per_chunk):
            batch = collate(chunk, pad_id, task)
            inputs = {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in model_inputs(batch, device).items()}
            with multi.select(torch.arange(n).repeat_interleave(len(chunk))):
                logits = model(**inputs).logits
            labels = batch["labels"].to(logits.device)
            for accumulator, part in zip(scores, logits.split(len(chunk)), strict=True):
                accumulator.add(part, labels)
            if on_batch:
                on_batch(len(chunk) * n)
    return [accumulator.metrics(len(examples)) for accumulator in scores]


def _stacked_measure(request: EvalRequest, rows, tokenizer, task: str):
    """Generation with every adapter: each prompt once per adapter, rows mixed in each batch."""
    prompts = _generation_prompts(request, rows, tokenizer)
    references = [datamod.reference_answer(row) for row in rows]

    def run(model, multi, device, on_batch) -> list[dict]:
        n = len(multi.names)
        predicted = [[""] * len(prompts) for _ in range(n)]
        outputs = generate_batched(
            model, tokenizer, prompts * n, [a for a in range(n) for _ in prompts], multi,
            max_new_tokens=request.max_new_tokens, batch_size=request.batch_size, device=device,
        )  # fmt: skip
        for position, text in outputs:
            predicted[position // len(prompts)][position % len(prompts)] = text
            if on_batch:
                on_batch(1)
        return [
            {
                "exact_match": exact_match(p, references, request.answer_regex),
                "examples": len(rows),
                "samples": [
                    {"prompt": q, "output": o, "reference": r}
                    for q, o, r in zip(prompts[:3], p[:3], references[:3], strict=True)
                ],
            }
            for p in predicted
        ]

    return run
