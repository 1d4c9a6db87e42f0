"""`loraxs eval --lm-eval TASKS`: EleutherAI's lm-evaluation-harness over the base or each adapter.

lm-eval runs through its own model class, `HFLM` (lm_eval/models/huggingface.py), handed our loaded
transformers model (the adapter's LoRA-XS layers injected) and the base's tokenizer. HFLM takes a built
`PreTrainedModel` as `pretrained` and uses it as it is (no reload, no device move), so everything that
decides a score is lm-eval's own code, as `lm_eval --model hf` runs it: the prompts and few-shot
contexts of the task, the context/continuation split of the tokens (`TemplateLM._encode_pair`), left
truncation at the model's positions, batching, and the log-softmax summed over each continuation's
tokens. An `lm_eval.api.model.LM` subclass of our own would have to repeat all of that.

The adapters are applied one after another to the one loaded base, one `simple_evaluate` each: lm-eval's
evaluate() sends each kind of request to the model once and wants one answer per request, which leaves
no room for the stacked several-adapter pass of `eval --data` (multi.py). The tasks are built once and
reused by every adapter (each run builds its own requests from them; the few-shot sampler is reseeded).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInputError, IncompatibleError, UsageError

EXTRA = "loraxs[lm-eval]"


def require_lm_eval():
    """The lm_eval package, or one line naming the extra to install (a usage error, exit 2)."""
    try:
        import lm_eval  # optional (the lm-eval extra): imported only when --lm-eval is given
        import lm_eval.evaluator  # simple_evaluate
    except ImportError:
        raise UsageError(f"--lm-eval needs lm-evaluation-harness: pip install '{EXTRA}'") from None
    # HFLM warns that a built model skips its loading options, which is how it is used here.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval


def parse_task_list(text: str) -> list[str]:
    """'arc_easy, hellaswag' -> ['arc_easy', 'hellaswag'] (lm-eval's own comma-separated form)."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise UsageError("--lm-eval needs at least one task name, e.g. --lm-eval arc_easy,hellaswag")
    return names


@dataclass
class HarnessRequest:
    model: str
    tasks: list[str]  # lm-eval task, group or tag names, glob patterns ('mmlu_*'), or YAML files
    adapters: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)  # extra task directories (lm-eval's include_path)
    num_fewshot: int | None = None  # None: each task's own
    limit: int | None = None  # the first N documents of each task
    batch_size: int = 16
    device: str | None = None
    dtype: str = "auto"
    quantize: str | None = None

    def __post_init__(self) -> None:
        """Refuse what no run can do before anything is read: lm_eval missing, bad counts, no tasks."""
        require_lm_eval()
        if self.quantize is not None:
            from .quantize import require_backend

            require_backend(self.quantize)
        if not self.tasks:
            raise UsageError("--lm-eval needs at least one task name")
        counts = {"--batch-size": self.batch_size, "--limit": self.limit}
        for flag, value in counts.items():
            if value is not None and value <= 0:
                raise UsageError(f"{flag} must be positive, got {value}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UsageError(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        for directory in self.include:
            if not Path(directory).is_dir():
                raise BadInputError(f"--lm-eval-include {directory}: no such directory")


def prepare_tasks(include: Sequence[str], names: Sequence[str]) -> tuple:
    """(lm-eval TaskManager, the top-level Task and Group objects of the names), every name checked.

    The tasks are built once (their data sets read through the `datasets` cache) and handed to every
    adapter's run; a task whose config or data cannot be loaded is one line here, before the model is
    read. With --lm-eval-include, or YAML files alone, a manager of those directories alone (none) is
    tried first: indexing lm-eval's own ~15,000 task configs takes about 10 s, which a run of local
    tasks should not pay. A name it does not know (a built-in task), or a local group of built-in
    tasks, brings in the full index, the local directories over the built-ins as lm-eval orders them
    (TaskManager(include_path))."""
    from lm_eval.tasks import TaskManager

    if include or all(_is_yaml_file(name) for name in names):
        local = TaskManager(include_path=list(include) or None, include_defaults=False)
        specs = resolve_tasks(local, names, missing_ok=True)
        if specs is not None:
            try:
                return local, _top_level(local.load(specs))
            except Exception:  # e.g. a local group of built-in tasks: try the full index
                pass
    manager = TaskManager(include_path=list(include) or None)
    specs = resolve_tasks(manager, names)
    try:
        loaded = manager.load(specs)
    except Exception as error:  # lm-eval and datasets raise many kinds; all are bad input
        first = (str(error).splitlines() or [""])[0]
        raise BadInputError(
            f"lm-eval cannot load {', '.join(specs)}: {type(error).__name__}: {first}"
        ) from None
    return manager, _top_level(loaded)


def resolve_tasks(manager, names: Sequence[str], *, missing_ok: bool = False) -> list[str] | None:
    """Names and globs matched against the manager's index (lm-eval's CLI: TaskManager.match_tasks);
    a YAML file is passed on as its path. An unknown name is one line with the closest known ones
    (None with `missing_ok`)."""
    specs: list[str] = []
    for name in names:
        found = [str(Path(name).resolve())] if _is_yaml_file(name) else manager.match_tasks([name])
        if not found:
            if missing_ok:
                return None
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UsageError(
                f"unknown lm-eval task {name!r}{hint}; `lm-eval ls tasks` lists them, "
                "--lm-eval-include DIR adds a directory of YAML tasks"
            )
        specs += [spec for spec in found if spec not in specs]
    return specs


def _is_yaml_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _top_level(loaded: dict) -> list:
    """TaskManager.load's flat dicts back to what was asked for: the groups that are no other group's
    child, then the tasks in no group (simple_evaluate flattens them again, and refuses duplicates)."""
    children = {child for kids in loaded["group_map"].values() for child in kids}
    groups = [group for name, group in loaded["groups"].items() if name not in children]
    return groups + [task for name, task in loaded["tasks"].items() if name not in children]


def require_causal_lm(names: Sequence[str], adapters: Sequence) -> None:
    """lm-eval scores a language model's log-likelihoods and generations: a classifier or regressor
    adapter (a task head) is refused (exit 4)."""
    for name, adapter in zip(names, adapters, strict=True):
        task = adapter.config.task
        if task not in (None, "causal-lm", "preference") or adapter.config.head:  # data.LM_TASKS
            raise IncompatibleError(
                f"adapter {name!r} ({adapter.path}) is a {task or 'task-head'} adapter: lm-eval needs a "
                "causal-lm adapter; measure it with `loraxs eval --data` instead"
            )


def run_harness(request: HarnessRequest, on_start: Callable | None = None, on_run: Callable | None = None):
    """Evaluate the base (no adapters) or each adapter on the lm-eval tasks; returns (rows, info):
    one row per adapter per task (and group), in adapter order, and what lm-eval ran."""
    import torch
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    from .adapter import apply_adapter
    from .devices import parse_device
    from .initialize import describe_base
    from .layer import remove
    from .models import backbone, evaluating, load_model, load_tokenizer
    from .sources import check_bases, load_adapters
    from .tasks import check_architecture

    base = describe_base(request.model, dtype=request.dtype)
    check_architecture("causal-lm", base.config, request.model)
    names, adapters = load_adapters(request.adapters, unique=False)
    check_bases(adapters, base, request.model)
    require_causal_lm(names, adapters)
    manager, tasks = prepare_tasks(request.include, request.tasks)
    tokenizer = load_tokenizer(base.resolved)
    device = parse_device(request.device)
    model = load_model(
        base.resolved, head="causal-lm", dtype=request.dtype, device=device, quantize=request.quantize
    )
    lm = _model_class(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=request.batch_size)
    if on_start:
        on_start(max(len(adapters), 1))
    rows: list[dict] = []
    info: dict = {}
    with evaluating(model), torch.no_grad():
        for adapter in adapters or [None]:
            if adapter is not None:
                apply_adapter(model, adapter)
            try:
                results = evaluator.simple_evaluate(
                    model=lm,
                    tasks=tasks,
                    num_fewshot=request.num_fewshot,
                    limit=request.limit,
                    batch_size=request.batch_size,
                    task_manager=manager,
                    log_samples=False,
                )
            finally:
                if adapter is not None:
                    remove(backbone(model))
            rows += result_rows(results, str(adapter.path) if adapter is not None else None)
            info = {"version": results.get("lm_eval_version"), "tasks": list(results["results"])}
            if on_run:
                on_run(1)
    return rows, info


def _model_class(HFLM) -> type:
    """HFLM whose request progress bars follow TQDM_DISABLE, which `loraxs` sets with --json, -q or no
    terminal (output.quiet_library_progress): lm-eval passes tqdm its own `disable=`, and tqdm reads the
    environment only for arguments it is not given. Nothing else changes."""

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or _bars_off())

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or _bars_off())

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or _bars_off())

    return QuietHFLM


def _bars_off() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in {"1", "true", "yes", "on"}


def result_rows(results: dict, adapter: str | None) -> list[dict]:
    """lm-eval's results, one row per task or group: {"adapter", "task", "examples", "num_fewshot",
    metric: value, ...}. lm-eval keys each metric as "metric,filter"; the filter is dropped when it
    is lm-eval's default "none" ("acc,none" -> "acc", "acc_stderr,none" -> "acc_stderr") and kept
    otherwise ("exact_match,strict-match"). A standard error lm-eval did not compute ("N/A") is None."""
    rows = []
    for task, reported in results["results"].items():
        row: dict = {"adapter": adapter, "task": task}
        samples = results.get("n-samples", {}).get(task)
        if samples:
            row["examples"] = samples.get("effective")
        if task in results.get("n-shot", {}):
            row["num_fewshot"] = results["n-shot"][task]
        for key, value in reported.items():
            if "," not in key:  # alias, name, sample_len: not metrics
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name == "none" else key
            row[name] = None if value == "N/A" else value
        rows.append(row)
    return rows
