"""Batched generation where each prompt names its adapter (or none), on one base model.

Adapters are stacked per factor set (multi.py) and every batch runs once through the model with
a per-row adapter index; the KV cache comes from `model.generate`. Prompts are JSONL rows
`{"adapter": NAME or null, "prompt": TEXT}` (or `"messages"`, rendered with the chat template).
Results are streamed, one JSON line per prompt as its batch finishes, with the row number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import check_generation_fits, prompt_text
from .datasources import DataSpec, read_rows
from .devices import parse_device
from .errors import BadInputError, IncompatibleError, UsageError
from .initialize import describe_base
from .models import evaluating, load_model, load_tokenizer
from .multi import group_by_factors, load_multi
from .quantize import require_backend
from .sources import RUN_ADAPTER_DIRS, check_bases, default_name, input_paths, load_adapters

__all__ = ["RUN_ADAPTER_DIRS", "GenerateRequest", "default_name", "generate_batched", "run_generate"]


@dataclass
class GenerateRequest:
    model: str
    prompts: str
    adapters: list[str] = field(default_factory=list)  # DIR, NAME=DIR, PACK.safetensors, PACK::NAME
    max_new_tokens: int = 64
    batch_size: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    quantize: str | None = None  # int8 | nf4: the base's linear layers quantized (quantize.py)
    # How --prompts is read when it is a dataset (datasources.py), and --columns FIELD=COLUMN
    data_config: str | None = None
    data_split: str | None = None
    data_revision: str | None = None
    columns: str | None = None

    def prompts_spec(self) -> DataSpec:
        return DataSpec(self.prompts, self.data_config, self.data_split, self.data_revision, self.columns)

    def __post_init__(self) -> None:
        """Refuse a request no generation can run (a usage error, before anything is read)."""
        self.prompts_spec()  # a malformed --columns
        if self.quantize is not None:  # an unknown kind, or bitsandbytes missing
            require_backend(self.quantize)
        for flag, value in (("--max-new-tokens", self.max_new_tokens), ("--batch-size", self.batch_size)):
            if value <= 0:
                raise UsageError(f"{flag} must be positive, got {value}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")


def generate_inputs(request: GenerateRequest) -> dict[str, Path]:
    """What `generate` reads, which its --out may not overlap: the prompts, the model (a local one),
    every adapter directory or pack, and the factor cache."""
    inputs = {"the prompts file": Path(request.prompts), "the model": Path(request.model)}
    return {**inputs, **input_paths(request.adapters)}


def require_causal_lm(names: Sequence[str], adapters: Sequence) -> None:
    """Generation needs causal-LM adapters: a classifier or regressor adapter is refused (exit 4)."""
    for name, adapter in zip(names, adapters, strict=True):
        task = adapter.config.task
        if task not in (None, "causal-lm", "preference") or adapter.config.head:  # data.LM_TASKS
            raise IncompatibleError(
                f"adapter {name!r} ({adapter.path}) is a {task or 'task-head'} adapter: generation "
                "needs a causal-lm adapter; measure it with `loraxs eval` instead"
            )


def read_prompts(
    path: str | DataSpec, tokenizer, names: Sequence[str], max_new_tokens: int | None = None
) -> list[tuple[int | None, str]]:
    """(adapter index or None, prompt text) per row; an unknown adapter name, or a prompt that with
    `max_new_tokens` passes the model's positions, is an error at its line."""
    position = {name: i for i, name in enumerate(names)}
    prompts = []
    for row in read_rows(path):
        wanted = row.fields.get("adapter")
        if wanted is not None and not isinstance(wanted, str):
            raise BadInputError(f"{row.where}: 'adapter' must be a name or null")
        if wanted is not None and wanted not in position:
            known = ", ".join(list(position)[:5]) or "none given"
            raise BadInputError(
                f"{row.where}: adapter {wanted!r} was not loaded (loaded: {known}); add it with --adapters"
            )
        prompt = prompt_text(row, tokenizer)
        if max_new_tokens is not None:
            check_generation_fits(row, prompt, tokenizer, max_new_tokens)
        prompts.append((None if wanted is None else position[wanted], prompt))
    return prompts


@torch.no_grad()
def generate_batched(
    model,
    tokenizer,
    prompts: Sequence[str],
    index: Sequence[int],
    multi,
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, str]]:
    """Yield (position in `prompts`, new text) batch by batch; prompt i uses adapter index[i]
    (-1 none) of `multi` (a MultiAdapters, or None for the bare base; `index` is then ignored).
    Left padding, KV cache; greedy unless `temperature` > 0. The one generation loop: `generate`
    and `eval --generate` (evaluate.generate_texts) both run it."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    with evaluating(model):
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                enc = tokenizer(
                    [prompts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                selected = multi.select([index[i] for i in rows]) if multi is not None else nullcontext()
                with selected:
                    generated = model.generate(
                        **enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling
                    )
                texts = tokenizer.batch_decode(
                    generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
                yield from zip(rows, texts, strict=True)
        finally:
            tokenizer.padding_side = side


def load_named(specs: Sequence[str], base) -> tuple[list[str], list]:
    """Load the adapters the specs name (sources.py) and check each against the base (exit 4 on
    another base or a task that does not generate)."""
    names, adapters = load_adapters(specs)
    require_causal_lm(names, adapters)
    check_bases(adapters, base)
    return names, adapters


def run_generate(
    request: GenerateRequest,
    emit: Callable[[dict], None],
    on_start: Callable[[int], None] | None = None,
) -> int:
    """Generate for every prompt row, calling emit({"row", "adapter", "prompt", "output"}) as
    batches finish. Adapters of different factor sets run as separate groups. Returns the row count."""
    base = describe_base(request.model, dtype=request.dtype)
    names, adapters = load_named(request.adapters, base)
    tokenizer = load_tokenizer(base.resolved)
    prompts = read_prompts(request.prompts_spec(), tokenizer, names, request.max_new_tokens)
    if on_start:
        on_start(len(prompts))
    device = parse_device(request.device)
    model = load_model(
        base.resolved, head="causal-lm", dtype=request.dtype, device=device, quantize=request.quantize
    )
    torch.manual_seed(request.seed)
    groups = group_by_factors(adapters) or [[]]
    for number, group in enumerate(groups):
        # Rows without an adapter ride along with the first group.
        rows = [i for i, (a, _) in enumerate(prompts) if (a in group) or (a is None and number == 0)]
        if not rows:
            continue
        multi = load_multi(model, [adapters[i] for i in group], [names[i] for i in group]) if group else None
        local = {a: k for k, a in enumerate(group)}
        try:
            outputs = generate_batched(
                model,
                tokenizer,
                [prompts[i][1] for i in rows],
                [-1 if prompts[i][0] is None else local[prompts[i][0]] for i in rows],
                multi,
                max_new_tokens=request.max_new_tokens,
                batch_size=request.batch_size,
                temperature=request.temperature,
                top_p=request.top_p,
                device=device,
            )
            for position, text in outputs:
                row = rows[position]
                adapter = prompts[row][0]
                emit(
                    {
                        "row": row,
                        "adapter": None if adapter is None else names[adapter],
                        "prompt": prompts[row][1],
                        "output": text,
                    }
                )
        finally:
            if multi is not None:
                multi.remove()
    return len(prompts)
