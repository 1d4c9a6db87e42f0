"""Setup of a training run, in the order it happens: the rows and their split, the factor request (the
method's part of it), the tokenizer and the encoded examples, the factors (cache or init), the model
with its adapter layers and its trainable head. `prepare` runs them; `train --dry-run` reuses the
steps it needs, so the plan and the run cannot disagree (the held-out split, say)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .. import data as datamod
from .. import datasources
from ..factors import SVDSettings
from ..initialize import FactorPlan, FactorRequest, ensure_factors, plan_factors
from ..layer import inject, set_fused
from ..methods import get_method
from ..methods.sb import OfficialEta, SBInit, parse_bytes
from ..models import backbone, head_kwargs, load_model, load_tokenizer, parse_targets
from ..packing import check_packed_attention, pack
from ..tasks import check_architecture
from ..tokenized import encode_cached
from .config import TrainConfig, with_defaults, with_task
from .distributed import Dist
from .fsdp import build_sharded


@dataclass
class Prepared:
    """Everything the loop needs, built once."""

    config: TrainConfig
    tokenizer: object
    model: torch.nn.Module
    plan: object
    entry: object
    cache_hit: bool
    labels: list[str] | None
    train: list
    held_out: list
    head_names: list[str]
    data_sha256: str
    train_rows: int = 0  # rows of --data trained on (examples may be more: long texts are cut)
    data_record: dict | None = None  # what --data is (datasources.Source.describe), for the adapter
    stream: datasources.RowStream | None = None  # --streaming: the rows, read as the steps need them


def prepare(config: TrainConfig, dist: Dist, device: torch.device, events) -> Prepared:
    """Resolve the base, read the data, get the factors (running init on a miss), build the model.
    `events` (a TrainEvents) gets the lines worth saying."""
    config, rows, inferred = resolve(config)
    stream = datasources.open_stream(config.data_spec()) if config.streaming else None
    labels = label_map(config, rows, stream)
    train_rows, held_rows = split_rows(config, rows)
    sharded = ShardedBase(config, labels, device, dist.world) if dist.sharded else None
    request, compute, note = factor_request(config, device, dist, sharded)
    if note:
        events.message(note)
    plan = plan_factors(request)
    check_architecture(config.task, plan.base.config, config.model)
    # Encode before any SVD so a bad row fails in seconds, not after minutes of factor computation.
    tokenizer = load_tokenizer(plan.base.resolved)
    limit = datamod.token_limit(tokenizer)
    if limit is not None and config.max_length > limit:  # data.encode cuts the examples there
        events.message(f"--max-length {config.max_length}: the model takes {limit} tokens; using {limit}")
    # --streaming: the training rows are tokenised as the steps need them (train/examples.py)
    train_examples = [] if stream else encode(config, tokenizer, labels, train_rows)
    if config.packing:  # the held-out examples stay unpacked
        train_examples, note = pack_training(config, tokenizer, train_examples)
        events.message(note)
    held_examples = encode(config, tokenizer, labels, held_rows) if held_rows else []
    if inferred:  # said once the rows are known to fit it, so a bad row's error stays one line
        events.message(inferred)
    entry, hit = get_factors(config, plan, compute, dist, events)
    if sharded:
        model = sharded(plan)  # LoRA-SB's gradient pass may have built it already
        set_pad_token(model, tokenizer)
    else:
        model = load_base(config, plan, tokenizer, labels, device)
    factors = entry.load(config.rank, plan.targets)
    inject(
        backbone(model),
        {m: (f["A"].to(device), f["B"].to(device)) for m, f in factors.items()},
        scaling=scaling(config),
        R=initial_R(config, factors),
        init_std=config.init_std,
        seed=config.seed,
    )
    if sharded:
        # The fused [W; A] path rebinds the base weight's storage, which FSDP2 owns: off under sharding.
        set_fused(model, False)
    head_names = make_trainable(model, config)
    source = stream.source if stream else datasources.open_source(config.data_spec())
    if config.packing:  # before any step: an architecture whose attention ignores the restarts is refused
        check_packed_attention(model, device, config.model)
    return Prepared(
        config,
        tokenizer,
        model,
        plan,
        entry,
        hit,
        labels,
        train_examples,
        held_examples,
        head_names,
        source.content_id(),
        0 if stream else len(train_rows),
        data_record=source.describe(),
        stream=stream,
    )


def resolve(config: TrainConfig) -> tuple[TrainConfig, list, str | None]:
    """The config with its task resolved and its defaults filled in, the rows of --data, and the line
    that says the task was inferred (None when --task gave it). With --streaming the rows are the
    stream's first STREAM_PEEK_ROWS, which the task is inferred from."""
    spec = config.data_spec()
    if config.streaming:
        rows = datasources.open_stream(spec).first_rows(STREAM_PEEK_ROWS)
    else:
        rows = datasources.read_rows(spec)
    config, inferred = with_task(config, rows)
    return with_defaults(config), rows, inferred


def split_rows(config: TrainConfig, rows: list) -> tuple[list, list]:
    """(training rows, held-out rows): --eval-data, or --eval-split of --data (stratified; the held-out
    part is ceil(split * rows), as sklearn counts it), or no held-out rows. The run and its dry-run
    both split here."""
    if config.eval_data:  # held-out data is read into memory, also with --streaming
        return rows, datasources.read_rows(config.data_spec().for_eval(config.eval_data))
    if config.eval_split:
        return datamod.stratified_split(rows, config.eval_split, config.seed, config.task)
    return rows, []


STREAM_PEEK_ROWS = 1000


def label_map(config: TrainConfig, rows: list, stream: datasources.RowStream | None = None):
    """The label map of a classification run (data.label_names): from the rows, or with --streaming
    from one pass over the stream's labels (nothing is tokenised)."""
    if config.streaming:
        stream = stream or datasources.open_stream(config.data_spec())
        return stream.label_names(config.task)
    return datamod.label_names(rows, config.task)


def encode(config: TrainConfig, tokenizer, labels: list[str] | None, rows: list) -> list:
    """The rows' examples, from the tokenisation cache when they were encoded so before (tokenized.py)."""
    return encode_cached(
        rows, tokenizer, config.task, max_length=config.max_length, labels=labels, chat_loss=config.chat_loss
    )


def pack_training(config: TrainConfig, tokenizer, examples: list) -> tuple[list, str]:
    """--packing: the examples in rows of at most --max-length tokens (the model's limit if lower, where
    data.encode cuts them), and the line that says how full the rows are."""
    length = min(config.max_length, datamod.token_limit(tokenizer) or config.max_length)
    rows = list(pack(examples, length))
    full = sum(len(e.input_ids) for e in rows) / max(len(rows) * length, 1)
    note = f"--packing: {len(examples):,} examples in {len(rows):,} rows of {length} tokens ({full:.0%} full)"
    return rows, note


def factor_request(
    config: TrainConfig,
    device: torch.device | None = None,
    dist: Dist | None = None,
    sharded: ShardedBase | None = None,
) -> tuple[FactorRequest, Callable | None, str | None]:
    """The factor request of the run (its method's recipe fields included), the method's compute step
    (None: the default XS SVD), and a line worth saying about it. `sharded`: the run's sharded base
    (--distributed fsdp), which LoRA-SB's gradient pass then runs on."""
    request = FactorRequest(
        model=config.model,
        rank=config.rank,
        targets=parse_targets(config.targets),
        method=config.method,
        svd=SVDSettings.for_backend(config.svd, config.niter, config.oversample, config.seed),
        dtype=config.dtype,
        device=str(device) if device is not None and device.type == "cuda" else None,
    )
    return with_method(request, config, dist or Dist(), sharded)


def get_factors(config: TrainConfig, plan: FactorPlan, compute: Callable | None, dist: Dist, events):
    """(entry, cache hit): the cached factors, or computed now (init) and cached."""
    if plan.entry:
        events.message(f"factor cache hit: {plan.entry.id}")
    else:
        what = f"{len(plan.targets)} {config.method.upper()} factor pairs at rank {config.rank}"
        events.message(f"factor cache miss: computing {what}")
        if get_method(config.method).collective and dist.enabled:
            # A gradient pass is collective: every process runs its share outside the cache lock,
            # then the first to take the lock writes the (identical) result.
            computed = compute(plan, None)
            compute = lambda plan_, on_module: computed  # noqa: E731
    return ensure_factors(plan, compute=compute)


def load_base(
    config: TrainConfig, plan: FactorPlan, tokenizer, labels: list[str] | None, device: torch.device
) -> torch.nn.Module:
    """The base model for the task (a fresh head initialised from the run's seed), on `device`."""
    torch.manual_seed(config.seed)
    # --quantize: the backbone's linear layers quantized on `device` as the model is loaded; `prepare` has
    # the factors (from the full-precision weights) by then, and no SVD ever sees a quantized layer.
    model = load_model(
        plan.base.resolved,
        dtype=config.dtype,
        device=device,
        quantize=config.quantize,
        **head_kwargs(config.task, labels),
    )
    set_pad_token(model, tokenizer)
    return model


def set_pad_token(model: torch.nn.Module, tokenizer) -> None:
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


class ShardedBase:
    """--distributed fsdp: the run's base sharded across the processes (fsdp.build_sharded), built once
    when first asked for: by LoRA-SB's gradient pass on a factor cache miss (it runs on the same
    sharded model, in the same dtype and with the same fresh head), else by `prepare`."""

    def __init__(self, config: TrainConfig, labels: list[str] | None, device: torch.device, world: int):
        self.config, self.labels, self.device, self.world = config, labels, device, world
        self.model: torch.nn.Module | None = None

    def __call__(self, plan: FactorPlan) -> torch.nn.Module:
        if self.model is None:
            config = self.config
            self.model = build_sharded(
                plan.base.resolved,
                head_kwargs(config.task, self.labels),
                plan.base.weights_dtype,
                config.seed,
                self.device,
                self.world,
            )
        return self.model


def make_trainable(model: torch.nn.Module, config: TrainConfig) -> list[str]:
    """Unfreeze the task head (everything outside the backbone) and switch on gradient checkpointing if
    asked; returns the head's parameter names. Call after `inject`. A causal LM has no head to train:
    its output layer (an untied lm_head) is frozen, so no gradient is computed, clipped or reduced for it."""
    head_names = train_head(model, config.task)
    if config.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return head_names


def train_head(model: torch.nn.Module, task: str | None) -> list[str]:
    """Unfreeze the task head (every parameter outside the backbone) of a classifier or regressor and
    return its names; a language model's output layer outside the backbone (an untied lm_head) is frozen
    instead. `make_trainable` and `api.attach` share it."""
    head_names = []
    core_params = {id(p) for p in backbone(model).parameters()}
    has_head = task not in datamod.LM_TASKS
    for name, param in model.named_parameters():
        if id(param) not in core_params:
            param.requires_grad_(has_head)
            if has_head:
                head_names.append(name)
    return head_names


# ----------------------------------------------------------------------------------------------
# The method (methods/): its recipe fields and compute step, initial R and scaling. Only the settings
# of LoRA-SB's gradient sample are train's own (TrainConfig.sb): `method_settings` builds them.


def with_method(
    request: FactorRequest, config: TrainConfig, dist: Dist, sharded: ShardedBase | None = None
) -> tuple[FactorRequest, Callable | None, str | None]:
    method = get_method(config.method)
    settings = method_settings(config)
    if sharded is not None and isinstance(settings, SBInit):
        settings = replace(settings, model=sharded)  # the gradient pass on the run's sharded base
    request, compute = method.prepare(
        request, settings, all_reduce=dist.all_reduce, shard=(dist.rank, dist.world)
    )
    note = None
    if isinstance(settings, SBInit) and settings.official_eta is not None:
        note = f"LoRA-SB eta = {request.extra['sb']['eta']:.4g} (the official code's rule)"
    return request, compute, note


def method_settings(config: TrainConfig) -> SBInit | None:
    """What the method's `prepare` takes besides the request: LoRA-SB's gradient sample, LoRA-XS nothing."""
    return sb_init(config) if get_method(config.method).needs_data else None


def sb_init(config: TrainConfig) -> SBInit:
    """LoRA-SB's gradient sample for a training run: drawn from the training rows only."""
    sb = config.sb
    return SBInit(
        data=config.data_spec(),
        task=config.task,
        samples=sb.samples,
        eta=sb.eta,
        batch_size=sb.batch_size,
        max_length=config.max_length,
        seed=config.seed,
        held_out_split=0.0 if config.eval_data else config.eval_split or 0.0,
        max_grad_memory=parse_bytes(sb.max_grad_memory),
        grad_mode=sb.grad_mode,
        accum_dtype=sb.accum_dtype,
        step=sb.step,
        official_eta=OfficialEta(config.lr, config.warmup_ratio, config.epochs) if sb.official_eta else None,
    )


def initial_R(config: TrainConfig, factors: dict) -> dict | None:
    """R0 per module (LoRA-SB: diag(S)); None: inject draws N(0, init_std^2) (LoRA-XS)."""
    return get_method(config.method).initial_R(factors)


def scaling(config: TrainConfig) -> float:
    """s of h = Wx + s B R A x (LoRA-XS: alpha / r, alpha defaulting to r; LoRA-SB: 1)."""
    return get_method(config.method).scaling(config.rank, config.alpha)
