"""`loraxs train MODEL --data TRAIN --task ... --rank R --out RUN_DIR`: train an adapter."""

from __future__ import annotations

from contextlib import ExitStack

import typer

from .options import (
    AT_LEAST_ONE,
    DATA_SOURCES_HELP,
    EVERY,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    SHARE,
    ChatLossOption,
    ColumnsOption,
    ConfigOption,
    DataConfigOption,
    DataRevisionOption,
    DataSplitOption,
    DeviceOption,
    Distributed,
    JsonOption,
    MaxLengthOption,
    MethodOption,
    ModelArgument,
    NiterOption,
    OversampleOption,
    Precision,
    QuantizeOption,
    QuietOption,
    ReportToOption,
    SbAccumDtypeOption,
    SbGradModeOption,
    SbLrOption,
    SbStepOption,
    Schedule,
    SvdOption,
    TargetsOption,
    TrainTaskOption,
    VerboseOption,
    WeightsDtypeOption,
    help_panels,
    lr_or_auto,
)
from .output import Output, get_output, handle_errors, styled
from .render import Fields, bytes_human, table

# `loraxs train --help` shows its options in these panels (every option is in one; MODEL is the argument).
TrainCommand = help_panels(
    {
        "Model and data": ("data", "data_config", "data_split", "data_revision", "columns", "streaming",
                           "shuffle_buffer", "task", "eval_data", "eval_split", "max_length", "chat_loss",
                           "beta", "packing", "group_by_length", "dtype", "quantize", "seed"),
        "Adapter": ("method", "rank", "alpha", "targets", "init_std", "embed_factors", "svd", "niter",
                    "oversample", "sb_samples", "sb_lr", "sb_official_eta", "sb_step", "sb_grad_mode",
                    "sb_accum_dtype", "sb_batch_size", "max_grad_memory"),
        "Optimisation": ("lr", "head_lr", "lr_find_steps", "weight_decay", "warmup_ratio", "schedule",
                         "max_grad_norm", "batch_size", "grad_accum", "gradient_checkpointing", "precision"),
        "Schedule and cadence": ("epochs", "max_steps", "eval_every", "eval_batch_size", "metric",
                                 "save_every", "keep_checkpoints", "log_every"),
        "Distribution": ("device", "distributed"),
        "Output": ("out_dir", "report_to", "resume", "force", "config", "dry_run", "measure", "json_flag",
                   "quiet", "verbose"),
    }
)  # fmt: skip


@handle_errors
def train(
    ctx: typer.Context,
    model: ModelArgument,
    data: str = typer.Option(..., "--data", "-d", help="Training data: " + DATA_SOURCES_HELP),
    data_config: DataConfigOption = None,
    data_split: DataSplitOption = None,
    data_revision: DataRevisionOption = None,
    columns: ColumnsOption = None,
    streaming: bool = typer.Option(
        False,
        "--streaming",
        help="Read and tokenise the rows as the steps need them (sets larger than memory); needs "
        "--max-steps. Held-out data is still read into memory.",
    ),
    shuffle_buffer: int = typer.Option(
        1000,
        "--shuffle-buffer",
        callback=EVERY,
        help="--streaming: shuffle the rows within a buffer of this many, seeded per epoch (0: in order).",
    ),
    task: TrainTaskOption = None,
    rank: int = typer.Option(16, "--rank", "-r", help="Rank r: each target module trains r x r numbers."),
    out_dir: str = typer.Option(..., "--out", "-o", help="Run directory (checkpoints, metrics, adapter)."),
    method: MethodOption = "xs",
    alpha: float | None = typer.Option(
        None, "--alpha", callback=POSITIVE, help="Scaling s = alpha / r (default alpha = r)."
    ),
    targets: TargetsOption = None,
    eval_data: str | None = typer.Option(
        None,
        "--eval-data",
        help="Held-out data for periodic evaluation, read into memory (as --data; ID[validation] for "
        "another split of the same dataset).",
    ),
    eval_split: float = typer.Option(
        0.0,
        "--eval-split",
        callback=SHARE,
        help="Hold out this share of --data instead (stratified for seq-cls).",
    ),
    max_length: MaxLengthOption = 512,
    chat_loss: ChatLossOption = "all",
    beta: float = typer.Option(
        0.1,
        "--beta",
        callback=POSITIVE,
        help="preference: DPO's beta, how far the adapter may move from the base (the reference).",
    ),
    packing: bool = typer.Option(
        False,
        "--packing",
        help="causal-lm: several examples per row of --max-length tokens, each with its own positions "
        "and attention (no padding); held-out data stays unpacked.",
    ),
    group_by_length: bool = typer.Option(
        False,
        "--group-by-length",
        help="Batch examples of similar length together (less padding), in a seeded order per epoch.",
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", "-b", callback=AT_LEAST_ONE, help="Examples per micro-batch and process."
    ),
    grad_accum: int = typer.Option(
        1, "--grad-accum", callback=AT_LEAST_ONE, help="Micro-batches per optimizer step."
    ),
    lr: str | None = typer.Option(
        None,
        "--lr",
        callback=lr_or_auto,
        help="AdamW learning rate of the R matrices, or 'auto' (a short LR range test picks it). "
        "Default: per task and method (README: Defaults).",
    ),
    head_lr: float | None = typer.Option(
        None,
        "--head-lr",
        callback=NON_NEGATIVE,
        help="Learning rate of a task head (classifier). Default: per task.",
    ),
    lr_find_steps: int = typer.Option(
        50, "--lr-find-steps", callback=AT_LEAST_ONE, help="--lr auto: steps of the range test."
    ),
    weight_decay: float = typer.Option(0.0, "--weight-decay", callback=NON_NEGATIVE),
    warmup_ratio: float | None = typer.Option(
        None, "--warmup-ratio", callback=SHARE, help="Share of steps with a linear warmup. Default: per task."
    ),
    schedule: Schedule = typer.Option("linear", "--schedule", help="Learning-rate schedule after warmup."),
    epochs: float = typer.Option(
        1.0, "--epochs", callback=POSITIVE, help="Passes over the data (ignored with --max-steps)."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", callback=AT_LEAST_ONE, help="Optimizer steps to run."
    ),
    max_grad_norm: float = typer.Option(
        1.0, "--max-grad-norm", callback=NON_NEGATIVE, help="Gradient clipping (0: off)."
    ),
    eval_every: int = typer.Option(
        0, "--eval-every", callback=EVERY, help="Evaluate every N steps (0: at the end)."
    ),
    metric: str | None = typer.Option(
        None, "--metric", help="Keep the best adapter by this eval metric (default: accuracy/pearson/loss)."
    ),
    save_every: int = typer.Option(
        100, "--save-every", callback=EVERY, help="Checkpoint every N steps (0: only at the end)."
    ),
    keep_checkpoints: int = typer.Option(
        2, "--keep-checkpoints", callback=AT_LEAST_ONE, help="Checkpoints kept on disk."
    ),
    log_every: int = typer.Option(
        10, "--log-every", callback=AT_LEAST_ONE, help="Write metrics.jsonl every N steps."
    ),
    seed: int = typer.Option(
        0, "--seed", callback=SEED, help="Seed of data order, R initialisation and a new head."
    ),
    precision: Precision = typer.Option(
        "auto", "--precision", help="Autocast: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."
    ),
    dtype: WeightsDtypeOption = "auto",
    quantize: QuantizeOption = None,
    device: DeviceOption = None,
    distributed: Distributed = typer.Option(
        "ddp",
        "--distributed",
        help="Under torchrun: ddp (each process holds the whole base) or fsdp (the base is sharded "
        "across the processes with FSDP2, for a base larger than one device).",
    ),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Trade compute for memory."
    ),
    svd: SvdOption = "torch",
    niter: NiterOption = None,
    oversample: OversampleOption = None,
    embed_factors: bool = typer.Option(
        False, "--embed-factors", help="Store A and B in the adapter (self-contained, larger)."
    ),
    report_to: ReportToOption = "none",
    resume: bool | None = typer.Option(
        None, "--resume/--no-resume", help="Continue the run in --out (default: if it has checkpoints)."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace the run in an existing --out: remove its checkpoints, metrics, config, loss.png, "
        "adapter/, best/, trackers.json and tensorboard/ (only what train wrote), then start anew.",
    ),
    eval_batch_size: int | None = typer.Option(
        None,
        "--eval-batch-size",
        callback=AT_LEAST_ONE,
        help="Examples per evaluation batch (default --batch-size).",
    ),
    init_std: float = typer.Option(
        1e-5,
        "--init-std",
        callback=NON_NEGATIVE,
        help="Standard deviation of R's random initialisation (LoRA-XS).",
    ),
    sb_samples: int = typer.Option(
        64,
        "--sb-samples",
        callback=AT_LEAST_ONE,
        help="LoRA-SB: examples whose mean gradient sets the factors.",
    ),
    sb_lr: SbLrOption = 3e-4,
    sb_official_eta: bool = typer.Option(
        False,
        "--sb-official-eta",
        help="LoRA-SB: eta = lr / (warmup_ratio * ceil(rows / sb_batch_size) * epochs) (official code).",
    ),
    sb_step: SbStepOption = "adam",
    sb_grad_mode: SbGradModeOption = "eval",
    sb_accum_dtype: SbAccumDtypeOption = "float32",
    sb_batch_size: int = typer.Option(
        8, "--sb-batch-size", callback=AT_LEAST_ONE, help="LoRA-SB: batch size of the gradient pass."
    ),
    max_grad_memory: str = typer.Option(
        "2GiB", "--max-grad-memory", help="LoRA-SB: budget for the gradient accumulators (e.g. 512MiB)."
    ),
    config: ConfigOption = None,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (cache hit/miss, steps, sizes, time estimate) and exit."
    ),
    measure: bool = typer.Option(
        True,
        "--measure/--no-measure",
        help="With --dry-run: time one training step on a real batch for the estimate (loads the weights).",
    ),
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Train a LoRA-XS (or LoRA-SB) adapter; writes RUN_DIR/adapter."""
    out = get_output(ctx)
    from ..train import TrainConfig

    settings = TrainConfig(
        model=model,
        data=data,
        out=out_dir,
        task=task,
        method=method,
        rank=rank,
        alpha=alpha,
        targets=targets,
        eval_data=eval_data,
        eval_split=eval_split,
        data_config=data_config,
        data_split=data_split,
        data_revision=data_revision,
        columns=columns,
        streaming=streaming,
        shuffle_buffer=shuffle_buffer,
        max_length=max_length,
        chat_loss=chat_loss,
        beta=beta,
        packing=packing,
        group_by_length=group_by_length,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=_parse_lr(lr),
        head_lr=head_lr,
        lr_find_steps=lr_find_steps,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        schedule=schedule,
        epochs=epochs,
        max_steps=max_steps,
        max_grad_norm=max_grad_norm,
        eval_every=eval_every,
        metric=metric,
        save_every=save_every,
        keep_checkpoints=keep_checkpoints,
        log_every=log_every,
        seed=seed,
        precision=precision,
        dtype=dtype,
        quantize=quantize,
        device=device,
        distributed=distributed,
        gradient_checkpointing=gradient_checkpointing,
        svd=svd,
        niter=niter,
        oversample=oversample,
        embed_factors=embed_factors,
        resume=_resume_mode(resume, force),
        report_to=report_to,
        eval_batch_size=eval_batch_size,
        init_std=init_std,
        sb={
            "samples": sb_samples,
            "eta": sb_lr,
            "batch_size": sb_batch_size,
            "max_grad_memory": max_grad_memory,
            "official_eta": sb_official_eta,
            "step": sb_step,
            "grad_mode": sb_grad_mode,
            "accum_dtype": sb_accum_dtype,
        },
    )
    if dry_run:
        from ..train import plan_training

        _render_plan(out, plan_training(settings, measure=measure))
        return
    from ..train import train as run

    with TrainDisplay(out) as display:
        result = run(settings, display.events())
    _render_result(out, result)


def _parse_lr(value: str | None) -> float | str | None:
    """--lr (already checked by its callback, options.lr_or_auto): a number, 'auto', or unset."""
    if value is None or value.strip().lower() == "auto":
        return None if value is None else "auto"
    return float(value)


def _resume_mode(resume: bool | None, force: bool) -> str:
    if force and resume:
        from ..errors import UsageError

        raise UsageError("--force replaces the run in --out, --resume continues it: pass one of them")
    return "fresh" if force else {None: "auto", True: "always", False: "never"}[resume]


class TrainDisplay:
    """Progress on stderr: a rich bar with loss, lr, tokens/s and ETA, or plain lines without a TTY."""

    def __init__(self, out: Output):
        self.out = out
        self.stack = ExitStack()
        self.advance = None

    def __enter__(self) -> TrainDisplay:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def events(self):
        from ..train import TrainEvents

        return TrainEvents(
            message=self.out.info, start=self._start, step=self._step, evaluated=self._evaluated
        )

    def _start(self, start_step: int, total_steps: int) -> None:
        self.advance = self.stack.enter_context(self.out.progress("train", total=total_steps))
        if start_step:
            self.advance(start_step, status="(resumed)")

    def _step(self, row: dict) -> None:
        status = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s"
        self.advance(1, status=status)

    def _evaluated(self, row: dict) -> None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row["eval"].items() if isinstance(v, float))
        self.out.info(f"eval at step {row['step']}: {shown}")


def _render_plan(out: Output, plan: dict) -> None:
    out.result({"dry_run": True, **plan}, _plan_view)


def _plan_view(plan: dict) -> Fields:
    rates = f"R {plan['lr']}" if plan["lr"] == "auto" else f"R {plan['lr']:g}"
    if plan.get("head_lr") is not None:
        rates += f", head {plan['head_lr']:g}"
    if plan.get("start") == "fresh":
        removed = ", ".join(plan["replaces"][:6]) + (", ..." if len(plan["replaces"]) > 6 else "")
        resume = f"no: --force removes the earlier run ({removed}), then a new run"
    else:
        resume = plan["resume"] or "no (new run)"
    rows = [
        ("factors", f"{plan['cache']} ({plan['method']}, {plan['modules']} modules, rank {plan['rank']})"),
        ("trainable", f"{plan['adapter_params']:,} adapter + {plan['head_params']:,} head parameters"),
        ("data", _data_line(plan)),
        ("packing", f"{plan['train_examples']:,} rows in {plan['packed_rows']:,} packed rows")
        if plan.get("packed_rows") is not None
        else None,
        ("schedule", f"{plan['steps']:,} steps of {plan['examples_per_step']} {_step_unit(plan)}"),
        ("memory", _memory(plan) + _quantized(plan)),
        ("lr", f"{rates}, warmup {plan['warmup_ratio']:g} of the steps"),
        ("time", _time(plan)) if "estimate" in plan else None,
        ("time", f"not measured ({plan['not_measured']})") if "not_measured" in plan else None,
        ("task", f"{plan['task']} (inferred from the rows)") if plan.get("task_inferred") else None,
        ("resume", resume),
    ]
    return Fields(styled("[bold]{}[/] -> {}", plan["model"], plan["out"]), rows, width=12)


def _data_line(plan: dict) -> str:
    held = f"{plan['eval_examples']:,} held out"
    if plan["train_examples"] is None:  # --streaming: a stream has no length
        return f"streamed (read and tokenised as the steps need them), {held}"
    return f"{plan['train_examples']:,} training rows, {held}"


def _step_unit(plan: dict) -> str:
    if plan.get("packing"):
        return "packed rows"
    return "examples, grouped by length" if plan.get("group_by_length") else "examples"


def _memory(plan: dict) -> str:
    if plan.get("distributed") == "fsdp" and plan.get("processes", 1) > 1:
        return (
            f"about {bytes_human(plan['weights_bytes_per_process'])} of base weights per process "
            f"({bytes_human(plan['weights_bytes'])} sharded over {plan['processes']} processes by FSDP2)"
        )
    return f"about {bytes_human(plan['weights_bytes'])} of base weights"


def _quantized(plan: dict) -> str:
    kind = plan.get("quantize")
    return f" ({kind}-quantized linear layers; factors of the full-precision base)" if kind else ""


def _time(plan: dict) -> str:
    return (
        f"{plan['estimate']} of training ({plan['step_seconds']:.3g} s per step, "
        f"measured on {plan['measured_on']}; evaluation not included)"
    )


def _render_result(out: Output, result) -> None:
    adapter_bytes = sum(p.stat().st_size for p in result.adapter_dir.iterdir() if p.is_file())
    doc = {
        "run_dir": str(result.run_dir),
        "adapter": str(result.adapter_dir),
        "best": str(result.best_dir) if result.best_dir else None,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "final_loss": result.final_loss,
        "eval": result.eval,
        "best_metric": result.best,
        "adapter_params": result.adapter_params,
        "head_params": result.head_params,
        "adapter_bytes": adapter_bytes,
        "factor_entry": result.factor_entry,
        "cache": "hit" if result.cache_hit else "miss",
        "seconds": round(result.seconds, 2),
        "lr": result.lr,
        "lr_find": result.lr_find,
    }

    out.result(doc, _result_view)


def _result_view(doc: dict):
    best, lr_find = doc["best_metric"], doc["lr_find"]
    rows = [
        ("adapter", f"{doc['adapter']} ({bytes_human(doc['adapter_bytes'])})"),
        ("trainable", f"{doc['adapter_params']:,} in R + {doc['head_params']:,} in the head"),
        ("--lr auto", f"R's lr {doc['lr']:.3g} (range test: {lr_find['rule']})") if lr_find else None,
        ("last train loss", f"{doc['final_loss']:.4f}") if doc["final_loss"] is not None else None,
        *(
            (f"eval {key}", f"{value:.4f}")
            for key, value in (doc["eval"] or {}).items()
            if isinstance(value, float)
        ),
        ("best", f"{best['metric']} {best['value']:.4f} at step {best['step']}") if best else None,
    ]
    title = f"trained {doc['steps']} steps in {doc['seconds']:.0f} s"
    return table(title, ["", ("", {"justify": "left"})], [row for row in rows if row], show_header=False)
