"""`loraxs train`, in the manner of a torchtune recipe; read the modules in this order:

    config.py       TrainConfig (a typed LoRA-SB section), the per-task DEFAULTS, config.yaml's document
    distributed.py  one process or torchrun: the process group, the device, reductions, rank 0
    fsdp.py         --distributed fsdp: the base built on meta, sharded with FSDP2, read shard by shard
    run_dir.py      RunDir: checkpoints, metrics.jsonl, config.yaml, loss.png, the lock, stale temporaries
    schedule.py     steps, the seeded order of examples, optimizer, learning-rate schedule, autocast
    setup.py        `prepare`: split, factors (the method's part in one place), tokenizer, model, head
    recipe.py       `train`: setup -> Trainer.loop (one `train_step` at a time, cadence) -> Trainer.finish
    trackers.py     --report-to: metrics.jsonl's rows and the settings to TensorBoard, MLflow, W&B, trackio
    dry_run.py      `train --dry-run`: the plan from the same steps, and a measured time per step

The run directory:

    RUN_DIR/config.yaml          the resolved settings
    RUN_DIR/metrics.jsonl        step, loss, lr, tokens/s; eval rows
    RUN_DIR/checkpoints/step-N/  state.json + state.safetensors (no pickles, see checkpoint.py): R, head,
                                 optimizer, scheduler, RNG, data position
    RUN_DIR/adapter/             the final adapter;  RUN_DIR/best/  the best by --metric
    RUN_DIR/loss.png             the loss curve
    RUN_DIR/trackers.json        --report-to: each tracker's run and the last step sent to it
"""

from .config import (
    AUTO_LR,
    DEFAULTS,
    IDENTITY,
    RESUME_MODES,
    SCHEDULES,
    SBConfig,
    TrainConfig,
    config_from_document,
    settings_document,
    with_defaults,
    with_task,
)
from .distributed import Dist, init_distributed
from .dry_run import about, measure_step, plan_training
from .recipe import Trainer, TrainEvents, TrainResult, find_lr, train, trainable_state
from .run_dir import (
    CHECKPOINTS,
    RunDir,
    RunStart,
    checkpoint_dirs,
    earlier_run,
    latest_checkpoint,
    load_checkpoint,
    plan_run_dir,
    save_checkpoint,
)
from .schedule import autocast_for, make_optimizer, make_scheduler, step_indices, total_steps
from .setup import Prepared, prepare, sb_init, split_rows

__all__ = [
    "AUTO_LR",
    "CHECKPOINTS",
    "DEFAULTS",
    "IDENTITY",
    "RESUME_MODES",
    "SCHEDULES",
    "Dist",
    "Prepared",
    "RunDir",
    "RunStart",
    "SBConfig",
    "TrainConfig",
    "TrainEvents",
    "TrainResult",
    "Trainer",
    "about",
    "autocast_for",
    "checkpoint_dirs",
    "config_from_document",
    "earlier_run",
    "find_lr",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "measure_step",
    "plan_run_dir",
    "plan_training",
    "prepare",
    "save_checkpoint",
    "sb_init",
    "settings_document",
    "split_rows",
    "step_indices",
    "total_steps",
    "train",
    "trainable_state",
    "with_defaults",
    "with_task",
]
