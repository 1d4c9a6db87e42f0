"""`train`: fine-tune the R matrices (and a task head) of a LoRA-XS / LoRA-SB adapter.

    train(config)  =  setup (run directory, `prepare`, --lr auto, the Trainer)
                   -> Trainer.loop: `step` after `step`, logging, evaluating and saving at their cadence
                   -> Trainer.finish: the last evaluation, RUN/adapter, loss.png

One loop serves one process and torchrun: with WORLD_SIZE > 1 the model is wrapped in
DistributedDataParallel, or (--distributed fsdp) its base is sharded with FSDP2 (fsdp.py) and the
trained tensors' gradients are averaged after each step's passes. Every process sees the same global
order of examples; each optimizer step takes `batch_size * world * grad_accum` of them, rank k the
k-th slice of each micro-batch. Losses are
normalised by the global number of loss terms, so N processes give the same update as one process
with the same global batch. Ctrl-C and SIGTERM write a checkpoint, then stop (exit 130 in the CLI).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import data as datamod
from ..adapter import new_config, save_adapter
from ..checkpoint import rng_state, set_rng_state
from ..errors import BadInputError, DivergedError, UsageError
from ..evaluate import evaluate_examples
from ..fsutil import check_output, sigterm_as_interrupt
from ..layer import xs_modules
from ..lr_finder import LRFindSettings, lr_range_test
from ..methods import get_method
from ..models import backbone
from ..objective import default_metric, improves, loss_sum, model_inputs
from ..packing import flattened, uses_flash_attention
from ..paths import factors_root
from ..preference import DEFAULT_BETA, PREFERENCE, PairStats, pair_loss
from .config import AUTO_LR, TrainConfig
from .distributed import Dist, init_distributed, unwrap, wrap
from .examples import example_source
from .fsdp import report_memory
from .run_dir import RunDir
from .schedule import (
    autocast_for,
    examples_per_step,
    grouping,
    make_optimizer,
    make_scheduler,
    total_steps,
)
from .setup import Prepared, prepare, resolve
from .trackers import Trackers, open_trackers, parse_report_to


@dataclass
class TrainEvents:
    """Callbacks for progress; the CLI renders them, tests may record them."""

    message: Callable[[str], None] = lambda text: None
    start: Callable[[int, int], None] = lambda start_step, total_steps: None
    step: Callable[[dict], None] = lambda row: None
    evaluated: Callable[[dict], None] = lambda row: None


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    best_dir: Path | None
    steps: int
    trainable_params: int
    adapter_params: int
    head_params: int
    final_loss: float | None
    eval: dict | None
    best: dict | None
    factor_entry: str
    cache_hit: bool
    resumed_from: int | None
    seconds: float
    lr: float | None = None  # R's learning rate as trained (the range test's choice with --lr auto)
    lr_find: dict | None = None  # --lr auto: the range test's summary


def train(config: TrainConfig, events: TrainEvents | None = None) -> TrainResult:
    config.validate()
    events = events or TrainEvents()
    started = time.perf_counter()
    with sigterm_as_interrupt(), ExitStack() as held:
        dist, device = init_distributed(config.device, config.distributed)
        if config.distributed == "fsdp" and not dist.enabled:
            events.message("--distributed fsdp: one process, nothing to shard; training as one process")
        # The task first: it is part of the run's identity that a resume is checked against.
        resolved, _, _ = resolve(config)
        check_out(resolved)
        run = RunDir(resolved.out)
        created = not run.path.exists()
        try:
            found = open_run_dir(run, resolved, dist, held)
            prep = prepare(config, dist, device, events)  # it says what it inferred
        except BaseException:
            if created and dist.main:
                run.remove_if_empty()  # refused before training (a bad row, an unfit model): leave nothing
            raise
        if not prep.train and prep.stream is None:
            raise BadInputError(f"{prep.config.data}: no usable training examples")
        mode = "fsdp" if dist.sharded else "ddp"
        report_memory(prep.model, dist.rank, mode, "setup")  # with LORAXS_MEMORY_REPORT only
        trainer = Trainer(prep, run, dist, device, events, found)
        held.push(trainer.trackers)  # on the way out: each tracker's run finished, failed or killed
        trainer.loop()
        result = trainer.finish(started)
        report_memory(prep.model, dist.rank, mode, "end")
        return result


def check_out(config: TrainConfig) -> None:
    """--out may not be, lie inside or contain the model, the data or the factor cache (an existing
    --out is fine: it is the run to resume)."""
    inputs = {
        "the model": config.model,
        "the data": config.data,
        "the eval data": config.eval_data,
        "the factor cache": factors_root(),
    }
    check_output(config.out, inputs, force=True)


def open_run_dir(run: RunDir, config: TrainConfig, dist: Dist, held: ExitStack) -> tuple[Path, dict] | None:
    """Create and lock the run directory (rank 0), decide what to do with it (RunDir.plan), replace an
    earlier run with --force; returns the checkpoint to resume from, if any."""
    if dist.main:
        run.create()
        held.enter_context(run.lock())
    start = run.plan(config)
    if start.action == "fresh":
        dist.barrier()  # every process has looked before the first one removes
        if dist.main:
            run.remove(start.replaces)
        dist.barrier()
    return start.found


# ----------------------------------------------------------------------------------------------
# One optimizer step's forward and backward passes


@dataclass
class Passes:
    """What the forward and backward passes of one optimizer step need."""

    task: str
    batch_size: int  # per process and micro-batch
    grad_accum: int
    dist: Dist
    device: torch.device
    autocast: Callable | None
    scaler: torch.amp.GradScaler | None
    pad_id: int
    beta: float = DEFAULT_BETA  # preference: DPO's beta
    # preference: the reward sums of the last forward_backward, over all processes (PairStats)
    pairs: PairStats | None = None

    def forward_backward(self, model: torch.nn.Module, step_examples: list) -> tuple[float, float, int]:
        """(summed loss, tokens, loss terms) of one optimizer step over `step_examples` (this process
        takes its slice of each micro-batch); gradients accumulate into the model; loss and tokens are
        summed over all processes.

        Every process runs every micro-batch that holds examples (the last step of an epoch may hold
        fewer): DDP reduces the gradients in the last one's backward, and FSDP gathers the weights in
        every forward, so a process whose slice is empty runs the micro-batch's first example with a
        zero loss weight, and counts nothing. Preference pairs (preference.py): the reference pass and
        the policy's, their DPO loss summed over pairs; the rewards go to `self.pairs`."""
        dist = self.dist
        pairs = PairStats()
        total_terms = sum(e.num_targets for e in step_examples)
        loss_total, tokens = 0.0, 0
        micro = self.batch_size * dist.world
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        micro_batches = [step_examples[k * micro : (k + 1) * micro] for k in range(self.grad_accum)]
        micro_batches = [examples for examples in micro_batches if examples]  # the same on every process
        for k, examples in enumerate(micro_batches):
            chunk, weight = examples[dist.rank :: dist.world], 1.0
            if not chunk:
                chunk, weight = examples[:1], 0.0
            if chunk[0].position_ids is not None and uses_flash_attention(unwrap(model)):
                chunk = flattened(chunk)  # flash attention finds packed examples in a one-row batch only
            batch = datamod.collate(chunk, self.pad_id, self.task)
            sync = k == len(micro_batches) - 1 or not ddp
            with nullcontext() if sync else model.no_sync():
                if self.task == PREFERENCE:
                    summed, parts = pair_loss(model, batch, self.device, self.beta, self.autocast)
                    if weight:
                        pairs.add(*parts)
                else:
                    with self.autocast() if self.autocast else nullcontext():
                        logits = model(**model_inputs(batch, self.device)).logits
                    summed, _ = loss_sum(logits, batch["labels"].to(self.device), self.task)
            # DDP averages gradients over processes: scale so the result is the global mean.
            loss = summed * (dist.world * weight / max(total_terms, 1))
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            if weight:
                loss_total += float(summed.detach())
                # real tokens: no padding, packed or not, both sequences of a pair
                tokens += sum(len(e.input_ids) + len(e.rejected_ids or ()) for e in chunk)
        loss_total, tokens = dist.sum([loss_total, float(tokens)])
        if self.task == PREFERENCE:
            self.pairs = PairStats(dist.sum(pairs.values))
        return loss_total, tokens, total_terms


def passes_for(config: TrainConfig, dist: Dist, device: torch.device, tokenizer) -> Passes:
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    autocast = autocast_for(config.precision, device)
    return Passes(
        config.task, config.batch_size, config.grad_accum, dist, device, autocast, scaler,
        datamod.pad_id_of(tokenizer), config.beta,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The run


class Trainer:
    """A run between setup and finish: the model, its optimizer and schedule, and where it stands."""

    def __init__(
        self,
        prep: Prepared,
        run: RunDir,
        dist: Dist,
        device: torch.device,
        events: TrainEvents,
        found: tuple[Path, dict] | None,
    ):
        self.prep, self.run, self.dist, self.device, self.events = prep, run, dist, device, events
        self.config = config = prep.config  # the run's identity (and config.yaml): --lr may be "auto"
        self.per_step = examples_per_step(config, dist.world)
        self.grouping = grouping(config, prep.train, dist.world)  # --group-by-length
        self.source = example_source(prep, self.per_step, self.grouping)  # examples.py
        self.steps = total_steps(config, len(prep.train), dist.world)
        self.metric = config.metric or default_metric(config.task)
        self.passes = passes_for(config, dist, device, prep.tokenizer)
        self.step, self.best, self.resumed_from, self.last_loss = 0, None, None, None
        prep.model.train()
        self.lr_found, lr_row = self._choose_lr(found)
        if self.lr_found is not None:
            prep.config = replace(config, lr=self.lr_found["lr"])  # the optimizer, schedule and card
        self.optimizer = make_optimizer(prep.model, prep.config, prep.head_names)
        self.scheduler = make_scheduler(self.optimizer, prep.config, self.steps)
        if found:
            self._restore(found)
        self.last_saved = self.step
        if dist.main:
            # also with no checkpoint: a run killed before its first one logged rows already
            run.trim_metrics(self.step if found else -1)  # a fresh start keeps no rows, not even step 0's
            run.clean_stale_temps()
            if lr_row is not None:
                run.append_metrics(lr_row)
        self.model = wrap(prep.model, dist, device)
        self.trackers = Trackers()  # --report-to: rank 0's, sent every row metrics.jsonl gets (`record`)
        if dist.main:
            recorded = {"factor_entry": prep.entry.id, "world_size": dist.world, "labels": prep.labels}
            if self.lr_found is not None:
                recorded["lr_find"] = self.lr_found
            run.write_config(config, recorded)
            self.trackers = open_trackers(
                parse_report_to(config.report_to),
                run.path,
                run.config_document(config, recorded),
                self.step,
                run.metrics() if run.metrics_file.is_file() else [],
                self.events.message,
            )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    def _choose_lr(self, found: tuple[Path, dict] | None) -> tuple[dict | None, dict | None]:
        """--lr auto: the range test picks R's lr (a resumed run takes the one its first start picked);
        the identity keeps "auto". Returns the test's summary and its metrics row (None, None without)."""
        if self.config.lr != AUTO_LR:
            return None, None
        if found:
            summary = found[1].get("lr_find")
            if summary is None:
                raise BadInputError(f"{found[0]}: no --lr auto result in this checkpoint; pass --lr")
            return summary, None
        result = find_lr(self.prep, replace(self.passes, scaler=None), self.events)
        return result.summary(), result.row()

    def _restore(self, found: tuple[Path, dict]) -> None:
        path, state = found
        model = self.prep.model
        layers = xs_modules(backbone(model))
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["R"].items():
                layers[name].R.copy_(value)
            for name, value in state["head"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.best, self.resumed_from = state["step"], state.get("best"), state["step"]
        self.source.restore(state.get("data_position"), self.step)  # --streaming: back to its row
        self.events.message(f"resuming from {path} (step {self.step} of {self.steps})")

    # ------------------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, int]:
        """One optimizer step on the examples of step `self.step`; returns (mean loss, tokens)."""
        optimizer, scaler = self.optimizer, self.passes.scaler
        loss_total, tokens, total_terms = self.passes.forward_backward(
            self.model, self.source.examples_for_step(self.step)
        )
        if self.dist.sharded:  # FSDP reduces none of them: R and the head are outside its groups
            self.dist.average_(_grads(self.trainable))
        mean_loss = loss_total / max(total_terms, 1)
        if not math.isfinite(mean_loss):
            kept = self.run.checkpoint_dirs()
            where = f"; last good checkpoint: {kept[-1]}" if kept else ""
            raise DivergedError(
                f"training diverged: loss is {mean_loss} at step {self.step + 1}{where}; lower --lr"
            )
        if scaler:
            scaler.unscale_(optimizer)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_loss = mean_loss
        return mean_loss, int(tokens)

    def loop(self) -> None:
        """Steps until the last one; logs, evaluates and saves at their cadence (--log-every,
        --eval-every, --save-every). Ctrl-C or SIGTERM: the checkpoint is written, then it stops."""
        config = self.config
        self.events.start(self.step, self.steps)
        window_tokens, window_start = 0, time.perf_counter()
        try:
            while self.step < self.steps:
                loss, tokens = self.train_step()
                window_tokens += tokens
                elapsed = time.perf_counter() - window_start
                row = {
                    "step": self.step,
                    "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                }
                if self.passes.pairs is not None:  # preference: the step's mean rewards, TRL's names
                    row.update(self.passes.pairs.metrics())
                self.events.step(row)
                if self._due(config.log_every) or self.step == self.steps:
                    self.log(row)
                    window_tokens, window_start = 0, time.perf_counter()
                if self._due(config.eval_every) and self.step < self.steps:
                    self.keep_best(self.evaluate(), loss)
                if self._due(config.save_every):
                    self.save()
        except KeyboardInterrupt:
            self.save()
            self.events.message(
                f"interrupted at step {self.step}: checkpoint written to {self.run.checkpoints}"
            )
            raise

    def finish(self, started: float) -> TrainResult:
        """The final evaluation (and RUN/best), the last checkpoint, RUN/adapter and loss.png."""
        final_eval = self.evaluate()
        self.keep_best(final_eval, self.last_loss)
        self.save()
        prep, model = self.prep, self.model
        if self.dist.main:
            R, head = trainable_state(model, prep.head_names)
            metrics = card_metrics(self.step, self.last_loss, final_eval, self.best)
            write_adapter(prep, self.run.adapter, R, head, metrics)
            self.run.plot()
        self.dist.barrier()
        return TrainResult(
            run_dir=self.run.path,
            adapter_dir=self.run.adapter,
            best_dir=self.run.best if self.best else None,
            steps=self.step,
            trainable_params=sum(p.numel() for p in self.trainable),
            adapter_params=sum(r.numel() for r in trainable_state(model, [])[0].values()),
            head_params=sum(p.numel() for n, p in unwrap(model).named_parameters() if n in prep.head_names),
            final_loss=self.last_loss,
            eval=final_eval,
            best=self.best,
            factor_entry=prep.entry.id,
            cache_hit=prep.cache_hit,
            resumed_from=self.resumed_from,
            seconds=time.perf_counter() - started,
            lr=prep.config.lr,
            lr_find=self.lr_found,
        )

    # ------------------------------------------------------------------------------------------

    def _due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0

    def log(self, row: dict) -> None:
        if self.dist.main:
            self.record({**row, "epoch": round(self.source.epoch(self.step), 4)})

    def record(self, row: dict) -> None:
        """A row of RUN/metrics.jsonl, and the same row to the --report-to trackers (rank 0)."""
        self.run.append_metrics(row)
        self.trackers.log(row)

    def evaluate(self) -> dict | None:
        """The held-out metrics now (rank 0; None elsewhere or without held-out data). A sharded base
        runs its forward passes together: every process evaluates, rank 0 keeps the result."""
        prep = self.prep
        if not prep.held_out or not (self.dist.main or self.dist.sharded):
            return None
        metrics = evaluate_examples(
            unwrap(self.model),
            prep.held_out,
            self.config.task,
            batch_size=self.config.eval_batch_size or self.config.batch_size,
            pad_id=self.passes.pad_id,
            device=self.device,
            autocast=self.passes.autocast,
            beta=self.config.beta,
        )
        if self.dist.sharded:
            self.model.reshard()  # FSDP keeps the root's weights whole after a forward without backward
        return metrics if self.dist.main else None

    def keep_best(self, metrics: dict | None, train_loss: float | None) -> None:
        """Log an evaluation; keep RUN/best when it improves on the best so far (`objective.improves`:
        ties on --metric go to the lower eval loss, then to the later step)."""
        if metrics is None:
            return
        if self.metric not in metrics:
            raise UsageError(
                f"--metric {self.metric!r} is not measured for {self.config.task}: "
                f"use one of {sorted(metrics)}"
            )
        row = {"step": self.step, "eval": metrics}
        self.events.evaluated(row)
        self.record(row)
        if improves(self.metric, metrics, self.best):
            self.best = {
                "step": self.step,
                "metric": self.metric,
                "value": metrics[self.metric],
                "metrics": metrics,
            }
            R, head = trainable_state(self.model, self.prep.head_names)
            write_adapter(self.prep, self.run.best, R, head, card_metrics(self.step, train_loss, metrics))

    def save(self) -> None:
        """A checkpoint of the current step (rank 0), unless the last one is of this step already."""
        if self.step <= self.last_saved:
            return
        self.last_saved = self.step
        if self.dist.main:
            self.run.save_checkpoint(self.step, self.checkpoint_state(), self.config.keep_checkpoints)

    def checkpoint_state(self) -> dict:
        R, head = trainable_state(self.model, self.prep.head_names)
        return {
            "step": self.step,
            "R": R,
            "head": head,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "best": self.best,
            "identity": self.config.identity(),
            "data_position": self.source.position(self.step),
            "lr_find": self.lr_found,
        }


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of `params`, a zero one for any that got none (every process reduces the same list)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def trainable_state(model: torch.nn.Module, head_names: list[str]) -> tuple[dict, dict]:
    """Copies (CPU) of R per adapted module and of the head's parameters."""
    layers = xs_modules(backbone(unwrap(model)))
    R = {name: m.R.detach().float().cpu().clone() for name, m in layers.items()}
    named = dict(unwrap(model).named_parameters())
    head = {n: named[n].detach().cpu().clone() for n in head_names}
    return R, head


# ----------------------------------------------------------------------------------------------
# --lr auto


def find_lr(prep: Prepared, passes: Passes, events: TrainEvents):
    """`--lr auto`: the LR range test (lr_finder.py) on R, on the run's own first batches, before the
    model is wrapped for DDP (gradients are averaged across processes by hand); everything it changes
    is restored. Returns the LRFindResult."""
    config, model, dist = prep.config, prep.model, passes.dist
    settings = LRFindSettings(steps=config.lr_find_steps)
    per_step = examples_per_step(config, dist.world)
    params = [p for p in model.parameters() if p.requires_grad]
    source = example_source(prep, per_step, grouping(config, prep.train, dist.world))  # its own: step 0 on
    events.message(
        f"--lr auto: LR range test, {settings.steps} steps from {settings.min_lr:g} to {settings.max_lr:g}"
    )

    def step_loss(k: int) -> float:
        examples = source.examples_for_step(k)
        loss_total, _, total_terms = passes.forward_backward(model, examples)
        return loss_total / max(total_terms, 1)

    def set_lr(optimizer, lr: float) -> None:
        optimizer.param_groups[0]["lr"] = lr  # R's group; a head's group keeps its lr

    def progress(k: int, lr: float, loss: float) -> None:
        if (k + 1) % 10 == 0:
            events.message(f"--lr auto: step {k + 1}/{settings.steps}, lr {lr:.2e}, loss {loss:.4f}")

    result = lr_range_test(
        params,
        lambda lr: make_optimizer(model, replace(config, lr=lr), prep.head_names),
        set_lr,
        step_loss,
        settings=settings,
        max_grad_norm=config.max_grad_norm,
        all_reduce_grads=dist.average_ if dist.enabled else None,
        broadcast=(lambda lr: dist.from_rank0(lr, params[0].device)) if dist.enabled else None,
        on_step=progress,
    )
    rules = {"valley": "half-way down the longest descent", "min/10": "minimum loss / 10"}
    how = rules.get(result.rule, result.rule)
    events.message(f"--lr auto: R's lr {result.lr:.3g} ({how} of the smoothed loss)")
    return result


# ----------------------------------------------------------------------------------------------
# The adapters of a run: RUN/adapter and RUN/best


def write_adapter(prep: Prepared, out: Path, R: dict, head: dict, metrics: dict) -> None:
    config = prep.config
    # What --data is (datasources.Source.describe): a file and its sha256, or a dataset: its hub id,
    # config, split, revision and fingerprint, or its directory (save_to_disk) and split.
    source = dict(prep.data_record or {"kind": "file"})
    is_file = source["kind"] in ("file", "arrow")
    for key in ("path", "file", "sha256"):
        source.pop(key, None)
    streamed = prep.stream is not None
    data = {
        "path": str(config.data),
        "file": Path(config.data).name if is_file else None,
        "sha256": prep.data_sha256 if is_file else None,
        **({} if is_file else source),
        "task": config.task,
        "rows": None if streamed else prep.train_rows,  # a stream's length is not known
        "examples": None if streamed else len(prep.train),
        "eval_examples": len(prep.held_out),
        "eval_data": Path(config.eval_data).name if config.eval_data else None,
        "eval_split": config.eval_split if not config.eval_data else None,
    }
    data.update({k: v for k, v in (("columns", config.columns), ("streaming", streamed)) if v})
    extra = {
        "data": data,
        "metrics": metrics,
        "training": {
            k: getattr(config, k) for k in ("lr", "head_lr", "batch_size", "grad_accum", "seed", "schedule")
        },
    }
    if config.task == PREFERENCE:  # `eval` measures the rewards with the beta it was trained with
        extra["training"]["beta"] = config.beta
    if config.quantize:  # trained on a quantized base; its factors are still the full-precision base's
        extra["training"]["quantized"] = config.quantize
    extra.update(get_method(config.method).adapter_extra(prep.entry.meta.get("recipe", {}).get("extra")))
    adapter_config = new_config(
        prep.plan.base,
        prep.entry,
        rank=config.rank,
        alpha=config.alpha,
        modules=sorted(R),
        task=config.task,
        labels=prep.labels,
        extra=extra,
    )
    factors = prep.entry.load(config.rank, sorted(R)) if config.embed_factors else None
    save_adapter(out, adapter_config, R, head=head, factors=factors)


def card_metrics(
    steps: int, train_loss: float | None, evaluated: dict | None, best: dict | None = None
) -> dict:
    """The adapter's metrics, each named for what it measures: `train_loss` (the last training step),
    `eval_<name>` (the held-out data at `steps`), `best_step` and `best_<metric>` (RUN/best)."""
    flat: dict = {"steps": steps}
    if train_loss is not None:
        flat["train_loss"] = round(train_loss, 4)
    for key, value in (evaluated or {}).items():
        if isinstance(value, float):
            flat[f"eval_{key}"] = round(value, 4)
    if evaluated:
        flat["eval_examples"] = evaluated.get("examples")
    if best:
        flat["best_step"] = best["step"]
        flat[f"best_{best['metric']}"] = round(best["value"], 4)
    return flat
