"""Options shared by several commands, and `--config FILE` (YAML or JSON) with flags taking precedence.

`--config` is eager: its callback runs before the other options are read and installs the file's
values as the command's default map, so any flag given on the command line still wins.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer

from ..errors import UsageError


def _load_config_file(ctx: typer.Context, param, value: str | None) -> str | None:
    if not value:
        return value
    path = Path(value)
    try:
        text = path.read_text()
    except OSError as error:
        raise typer.BadParameter(f"cannot read {path}: {error.strerror}") from None
    import yaml

    try:
        document = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise typer.BadParameter(f"{path}: unreadable ({str(error).splitlines()[0]})") from None
    except RecursionError:
        raise typer.BadParameter(f"{path}: nested too deeply to be option settings") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise typer.BadParameter(f"{path}: expected a mapping of option names to values")
    # A setting is named like a long flag (`out`, `max-steps`, `max_steps`) or like the parameter.
    known = {p.name: p.name for p in ctx.command.params}
    for p in ctx.command.params:
        known.update({o[2:].replace("-", "_"): p.name for o in p.opts if o.startswith("--")})
    known.pop("config", None)
    defaults = {}
    for key, setting in document.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name == RECORDED_SECTION:  # what `train` recorded in RUN/config.yaml, not a setting
            continue
        if name not in known:
            raise typer.BadParameter(f"{path}: unknown setting {key!r}{_hint(name, known)}")
        defaults[known[name]] = setting
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


RECORDED_SECTION = "recorded"

# Names other tools use (transformers' TrainingArguments, PEFT's LoraConfig, axolotl) -> our flags.
FOREIGN_NAMES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch-size",
    "train_batch_size": "batch-size",
    "micro_batch_size": "batch-size",
    "per_device_eval_batch_size": "eval-batch-size",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "gradient_accumulation_steps": "grad-accum",
    "lora_r": "rank",
    "r": "rank",
    "lora_alpha": "alpha",
    "target_modules": "targets",
    "lora_target_modules": "targets",
    "output_dir": "out",
    "model_name_or_path": "model",
    "base_model": "model",
    "base_model_name_or_path": "model",
    "lr_scheduler_type": "schedule",
    "warmup_steps": "warmup-ratio",
    "max_seq_length": "max-length",
    "sequence_len": "max-length",
    "cutoff_len": "max-length",
    "logging_steps": "log-every",
    "save_steps": "save-every",
    "eval_steps": "eval-every",
    "save_total_limit": "keep-checkpoints",
    "metric_for_best_model": "metric",
    "train_file": "data",
    "dataset": "data",
    "dataset_name": "data",
    "dataset_config_name": "data-config",
    "validation_file": "eval-data",
    "bf16": "precision",
    "fp16": "precision",
    "torch_dtype": "dtype",
    "resume_from_checkpoint": "resume",
}


def _hint(name: str, known: dict[str, str]) -> str:
    """'; use 'lr'' for a well-known name of another tool, or a close spelling of a real setting."""
    import difflib

    ours = FOREIGN_NAMES.get(name.lower())
    if ours is not None and ours.replace("-", "_") in known:
        if name.lower() == "warmup_steps":
            return f"; use '{ours}' (a share of the steps, e.g. 0.1)"
        return f"; use '{ours}'"
    close = difflib.get_close_matches(name, [k for k in known if k != RECORDED_SECTION], n=1, cutoff=0.75)
    return f"; did you mean '{close[0].replace('_', '-')}'?" if close else ""


# ---------------------------------------------------------------------------------------------
# Numbers. Every int and float option of every command names its range here, once, as a typer
# callback: `typer.Option(1.0, "--epochs", callback=POSITIVE)`. A callback runs on every value the
# option gets (the command line, a `--config` file, the default), before the command starts, so a
# NaN, an infinity or an out-of-range value is a usage error (exit 2) in one line that names the
# flag (and the config file it came from) and nothing is read or written. Ranks are the exception:
# their range depends on the model (r <= min(m, n)), so the core checks them (exit 3, bad input).

INT64_MAX = 2**63 - 1  # no count loraxs hands to torch can be larger
SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's random_state take at most 32 bits


class OptionValueError(typer.BadParameter):
    """A value outside its option's range; shown as is ("--lr must be > 0, got -1.0"), exit 2."""

    def format_message(self) -> str:
        return self.message


@dataclass(frozen=True)
class Bounds:
    """The valid values of a numeric option: finite (floats), within [ge | gt, le | lt]."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    what: str | None = None  # the range in words ("positive"), else it is written out

    def describe(self) -> str:
        """'positive', '>= 0', 'in [0, 1)'."""
        if self.what:
            return self.what
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if low and high:
            return f"in {low[0]}{_show(low[1])}, {_show(high[0])}{high[1]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {_show(low[1])}"
        if high:
            return f"{'<=' if high[1] == ']' else '<'} {_show(high[0])}"
        return "a finite number"

    def problem(self, flag: str, value: float | int) -> str | None:
        """Why `value` is not valid for `flag`, or None when it is."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"{flag} must be a finite number, got {value}"
        below = (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
        above = (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)
        if below or above:
            return f"{flag} must be {self.describe()}, got {value}"
        if isinstance(value, int) and value > INT64_MAX:
            return f"{flag} must be at most {INT64_MAX}, got {value}"
        if isinstance(value, int) and value < -INT64_MAX:
            return f"{flag} must be at least {-INT64_MAX}, got {value}"
        return None

    def check(self, flag: str, value: float | int | None) -> float | int | None:
        """The value, or a UsageError (for values that do not come through an option callback)."""
        problem = None if value is None else self.problem(flag, value)
        if problem:
            raise UsageError(problem)
        return value


def _show(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def Finite(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, what: str | None = None) -> Callable:  # fmt: skip
    """A typer callback that refuses a non-finite or out-of-range value (None passes: 'not given').

    Its `bounds` attribute is the Bounds it checks (for tests and for core checks of the same range).
    """
    bounds = Bounds(ge=ge, gt=gt, le=le, lt=lt, what=what)

    def check(ctx: typer.Context, param: typer.CallbackParam, value):
        if value is None or isinstance(value, bool):
            return value
        problem = bounds.problem(_flag(param), value)
        if problem is not None:
            _refuse(ctx, param, problem)
        return value

    check.bounds = bounds
    return check


def _flag(param: typer.CallbackParam) -> str:
    return next((o for o in param.opts if o.startswith("--")), param.opts[0] if param.opts else param.name)


def _refuse(ctx: typer.Context, param: typer.CallbackParam, problem: str):
    """Raise the one-line usage error, naming the --config file when the value came from it."""
    source = ctx.get_parameter_source(param.name) if param.name else None
    config = ctx.params.get("config")
    if source is not None and source.name == "DEFAULT_MAP" and config:
        problem += f" (in --config {config})"
    raise OptionValueError(problem, ctx=ctx, param=param)


def lr_or_auto(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """`--lr`: a positive finite number or 'auto' (kept as text; the command turns it into a number)."""
    if value is None or str(value).strip().lower() == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        _refuse(ctx, param, f"{_flag(param)} must be a positive number or 'auto', not {str(value)!r}")
    return value


POSITIVE = Finite(gt=0, what="positive")  # rates and scales: --lr, --epochs, --alpha, --sb-lr
# 0 means off or frozen: --max-grad-norm, --head-lr, --weight-decay, --temperature
NON_NEGATIVE = Finite(ge=0)
SHARE = Finite(ge=0, lt=1)  # a share of the steps or rows: --warmup-ratio, --eval-split
AT_LEAST_ONE = Finite(ge=1, what="positive")  # counts: batch sizes, steps, lengths, samples
EVERY = Finite(ge=0)  # every N steps, 0: only at the end; SVD iterations and oversampling
SEED = Finite(ge=0, le=SEED_MAX)
TOP_P = Finite(gt=0, le=1)


# ---------------------------------------------------------------------------------------------
# Choice options, shared by the commands. A Literal makes typer show `<xs|sb>` in --help, complete
# the values in every shell, and refuse any other value as a usage error (exit 2) before the
# command runs. The values mirror the core's tables (factors.SVD_BACKENDS, train.SCHEDULES, ...),
# which stay the authority for library callers; this module must not import torch.

Method = Literal["xs", "sb"]
Task = Literal["causal-lm", "seq-cls", "regression", "preference"]  # data.TASKS
WeightsDtype = Literal["auto", "fp32", "bf16", "fp16"]
StorageDtype = Literal["fp16", "bf16", "fp32", "int8"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
SvdBackend = Literal["torch", "sklearn", "exact"]
Schedule = Literal["linear", "cosine", "constant"]
Distributed = Literal["ddp", "fsdp"]  # train.config.DISTRIBUTED
ExportFormat = Literal["peft-lora"]
ImportFormat = Literal["peft-lora", "official"]
OfficialMethod = Literal["auto", "xs", "sb"]
ChatLoss = Literal["all", "last"]  # data.CHAT_LOSS
SbStep = Literal["adam", "sign"]  # sb.STEPS
SbGradMode = Literal["eval", "train"]  # sb.GRAD_MODES
SbAccumDtype = Literal["float32", "bfloat16"]  # sb.ACCUM_DTYPES
Quantize = Literal["int8", "nf4"]  # quantize.QUANTIZE_KINDS

TASK_HELP = (
    "causal-lm (prompt/response, messages, text), seq-cls (text + label), regression (float label) or "
    "preference (prompt/chosen/rejected: DPO)."
)
SVD_HELP = (
    "torch: randomized SVD on --device. sklearn: the official LoRA-XS call, TruncatedSVD on W^T. "
    "exact: full SVD, truncated (slow on large weights)."
)
TARGETS_HELP = (
    "Comma-separated module names, dotted suffixes or globs, or 'all-linear'. Default: per architecture."
)

MethodOption = Annotated[
    Method, typer.Option("--method", help="xs: SVD of the weights (LoRA-XS). sb: LoRA-SB factors.")
]
EvalTaskOption = Annotated[
    Task | None, typer.Option("--task", help=TASK_HELP + " Default: the adapter's task.")
]
TrainTaskOption = Annotated[
    Task | None, typer.Option("--task", help=TASK_HELP + " Default: inferred from the rows.")
]
SbTaskOption = Annotated[
    Task, typer.Option("--task", help="LoRA-SB: causal-lm, seq-cls, regression or preference.")
]
WeightsDtypeOption = Annotated[
    WeightsDtype, typer.Option("--dtype", help="Dtype the base weights are read in (auto: the checkpoint's).")
]
MergeDtypeOption = Annotated[
    WeightsDtype,
    typer.Option("--dtype", help="Dtype written: auto (each tensor's original dtype), fp32, bf16, fp16."),
]
StorageDtypeOption = Annotated[
    StorageDtype, typer.Option("--dtype", help="Storage dtype of the adapter numbers for the estimate.")
]
SvdOption = Annotated[SvdBackend, typer.Option("--svd", help=SVD_HELP)]
ToOption = Annotated[
    ExportFormat | None, typer.Option("--to", help="Export a loraxs adapter: peft-lora (exact).")
]
FromOption = Annotated[
    ImportFormat | None,
    typer.Option(
        "--from",
        help="Import: peft-lora (projected onto the LoRA-XS factors) or official (LoRA-XS/LoRA-SB, exact).",
    ),
]
OfficialMethodOption = Annotated[
    OfficialMethod,
    typer.Option(
        "--method", help="--from official: xs, sb, or auto (LoRA-SB when A and B are both orthonormal)."
    ),
]
QuantizeOption = Annotated[
    Quantize | None,
    typer.Option(
        "--quantize",
        help="Run the base's linear layers quantized (bitsandbytes, CPU or GPU): int8 (LLM.int8) or nf4 "
        "(4-bit NormalFloat); the head and embeddings stay as loaded, the factors are the full-precision "
        "base's. Needs pip install 'loraxs[quant]'.",
    ),
]
MergeQuantizeOption = Annotated[
    Quantize | None,
    typer.Option(
        "--quantize",
        help="With --verify: also compare with the int8- or nf4-quantized base + adapter (default: the "
        "quantization the adapter was trained on, if any). The merge always writes full-precision weights.",
    ),
]
ChatLossOption = Annotated[
    ChatLoss,
    typer.Option("--chat-loss", help="messages rows: loss on all assistant turns, or only the last."),
]
SbStepOption = Annotated[
    SbStep,
    typer.Option(
        "--sb-step", help="LoRA-SB: adam: dW = -eta G/(|G|+eps). sign: -eta sign(G), the official code's."
    ),
]
SbGradModeOption = Annotated[
    SbGradMode,
    typer.Option(
        "--sb-grad-mode",
        help="LoRA-SB: eval: gradient pass with dropout off. train: dropout on, as the official code.",
    ),
]
SbAccumDtypeOption = Annotated[
    SbAccumDtype,
    typer.Option(
        "--sb-accum-dtype",
        help="LoRA-SB: dtype of the gradient sums: float32, or bfloat16 (the official code's on bf16).",
    ),
]


# ---------------------------------------------------------------------------------------------
# Options and arguments that several commands share, once each (in the manner of the `hf` CLI).

ModelArgument = Annotated[str, typer.Argument(help="Local directory, Hugging Face model id, or .gguf file.")]
TargetsOption = Annotated[str | None, typer.Option("--targets", "-t", help=TARGETS_HELP)]
# Where rows come from (datasources.py): a file, a `datasets` directory or Arrow file, or a hub dataset id.
DATA_SOURCES_HELP = (
    ".jsonl, .csv, .parquet, .txt or .arrow file, a `datasets` directory (save_to_disk), or a hub dataset "
    "id (ID or ID[split], needs pip install 'loraxs[data]')."
)
DataConfigOption = Annotated[
    str | None,
    typer.Option("--data-config", help="A hub dataset's configuration (subset), as load_dataset's name."),
]
DataSplitOption = Annotated[
    str | None,
    typer.Option("--data-split", help="The split of a dataset (default: train); or write ID[split]."),
]
DataRevisionOption = Annotated[
    str | None, typer.Option("--data-revision", help="A hub dataset's branch, tag or commit.")
]
ColumnsOption = Annotated[
    str | None,
    typer.Option(
        "--columns",
        help="Rename columns to loraxs's fields: prompt=instruction,response=output (fields: prompt, "
        "response, messages, text, text_a, text_b, label, answer). alpaca and ShareGPT rows need none.",
    ),
]
MaxLengthOption = Annotated[
    int, typer.Option("--max-length", callback=AT_LEAST_ONE, help="Tokens per example (longer text is cut).")
]
MaxNewTokensOption = Annotated[
    int, typer.Option("--max-new-tokens", callback=AT_LEAST_ONE, help="Tokens generated per row at most.")
]
NiterOption = Annotated[
    int | None,
    typer.Option(
        "--niter", callback=EVERY, help="Power iterations of the randomized SVD (default: 4; sklearn: 10)."
    ),
]
OversampleOption = Annotated[
    int | None,
    typer.Option(
        "--oversample", callback=EVERY, help="Extra random directions, q = r + p (default: 16; sklearn: 10)."
    ),
]
SbLrOption = Annotated[
    float,
    typer.Option("--sb-lr", callback=POSITIVE, help="LoRA-SB: eta of the approximated first AdamW step."),
]
ForceReplaceOption = Annotated[bool, typer.Option("--force", help="Replace an existing --out directory.")]
ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        is_eager=True,
        callback=_load_config_file,
        help="YAML or JSON file of option values (names as the long flags); flags on the command line win.",
    ),
]


def _check_device(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """`--device`: the core's one parser (devices.parse_device), before the command starts: a device
    torch does not know or this machine does not have is one line and exit 3 in every command."""
    if value is None or ctx.resilient_parsing:  # not given, or shell completion
        return value
    from ..devices import parse_device  # torch: only once a --device is given
    from .output import report_error

    try:
        parse_device(value)
    except Exception as error:
        report_error(error)
    return value


def complete_devices(incomplete: str) -> list[str]:
    return [d for d in ("cpu", "cuda", "cuda:0", "cuda:1", "mps") if d.startswith(incomplete)]


DEVICE_HELP = "cpu, cuda, cuda:1, mps (default: the GPU if there is one, else the CPU)."
DeviceOption = Annotated[
    str | None,
    typer.Option("--device", callback=_check_device, autocompletion=complete_devices, help=DEVICE_HELP),
]
SvdDeviceOption = Annotated[
    str | None,
    typer.Option(
        "--device",
        callback=_check_device,
        autocompletion=complete_devices,
        help="Where the SVD runs: cpu, cuda, cuda:1 (default: cpu).",
    ),
]


# `train --report-to`: a comma-separated list, so no Literal; the core checks it (train.trackers, whose
# TRACKERS these mirror) and completion offers the names for the item being typed.
REPORT_TO = ("tensorboard", "mlflow", "wandb", "trackio")


def complete_report_to(incomplete: str) -> list[str]:
    done, comma, last = incomplete.rpartition(",")
    chosen = set(done.split(",")) if comma else set()
    names = [n for n in REPORT_TO if n not in chosen] + ([] if comma else ["none"])
    return [done + comma + n for n in names if n.startswith(last)]


ReportToOption = Annotated[
    str,
    typer.Option(
        "--report-to",
        autocompletion=complete_report_to,
        help="Send metrics.jsonl's rows and the settings to experiment trackers: a comma-separated subset "
        "of tensorboard, mlflow, wandb, trackio, or none. Each is set up by its own variables (README: "
        "Experiment trackers). Needs pip install 'loraxs[track]'.",
    ),
]


# The output options: accepted before the command (`loraxs --json init ...`) and after it
# (`loraxs init ... --json`). Each callback sets the invocation's Output (output.get_output), so the
# command reads `out.json_mode` and `out.verbosity` wherever the flag was written; -q wins over -v.
def _set_output(ctx: typer.Context, param: typer.CallbackParam, value):
    if ctx.resilient_parsing or not value:
        return value
    from .output import get_output

    out = get_output(ctx)
    if param.name == "json_flag":
        out.json_mode = True
    elif param.name == "quiet":
        out.quiet = True
    else:
        out.verbose += value
    return value


JsonOption = Annotated[
    bool,
    typer.Option(
        "--json",
        callback=_set_output,
        expose_value=False,
        help="Print one JSON document on stdout; logs and progress go to stderr.",
    ),
]
QuietOption = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", callback=_set_output, expose_value=False, help="Only errors and the result."
    ),
]
VerboseOption = Annotated[
    int,
    typer.Option(
        "--verbose", "-v", count=True, callback=_set_output, expose_value=False, help="More detail on stderr."
    ),
]


def help_panels(panels: dict[str, tuple[str, ...]]) -> type:
    """A command class that shows its options in rich help panels: {panel title: parameter names}.

    The shared options above stay one definition each; the panel is the command's choice."""
    from typer.core import TyperCommand

    where = {name: title for title, names in panels.items() for name in names}

    class PanelledCommand(TyperCommand):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for param in self.params:
                if param.name in where:
                    param.rich_help_panel = where[param.name]

    PanelledCommand.panels = panels
    return PanelledCommand


def complete_presets(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion of `inspect TARGET`: the built-in presets (paths come from the shell)."""
    from ..estimate import preset_names

    return [(name, "preset") for name in preset_names() if name.startswith(incomplete)]
