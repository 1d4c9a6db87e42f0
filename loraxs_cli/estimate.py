"""Parameter and storage arithmetic for `loraxs inspect`: pure integers, no weights loaded.

The point of LoRA-XS is the adapter's size: r^2 trainable numbers per target module, whatever
the model's width. This module turns a list of target shapes into the trainable-parameter count
and per-adapter storage of full fine-tuning, LoRA, VeRA and LoRA-XS/LoRA-SB, so the comparison
in the LoRA-XS paper (section 3, Table 1, the GPT-3 serving example) can be reproduced for any
model. `PRESETS` carries the shape tables of the papers' models, whose configs are not on disk.

Counts include only the adapter's own parameters, like the papers (LoRA-XS footnote 5): a task
head (e.g. a classifier) is common to all methods and left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from loraxs_cli.errors import BadInputError

FULL = "full"
LORA = "lora"
VERA = "vera"
LORA_XS = "lora-xs/sb"  # LoRA-SB trains the same r x r matrix R, so it has the same count.

__all__ = [
    "FULL",
    "LORA",
    "LORA_XS",
    "PRESETS",
    "VERA",
    "MethodEstimate",
    "ModuleShape",
    "Preset",
    "bytes_for_users",
    "estimate",
    "find_preset",
    "human_bytes",
    "preset_names",
    "unknown_preset_message",
]


@dataclass(frozen=True)
class ModuleShape:
    """One target linear layer: `W` is `(out_features, in_features)` = `(m, n)`, as nn.Linear stores it."""

    name: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class MethodEstimate:
    """Trainable numbers per adapter for one method, and what they take on disk at the given dtype."""

    method: str
    rank: int | None
    params: int
    bytes: int


def _positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInputError(f"{what} must be a positive integer, got {value!r}")
    return value


def estimate(
    shapes: Sequence[ModuleShape],
    rank: int,
    *,
    dtype_bytes: int = 2,
    lora_rank: int | None = None,
    vera_rank: int | None = None,
    total_params: int | None = None,
) -> list[MethodEstimate]:
    """Per-adapter counts for full fine-tuning, LoRA, VeRA and LoRA-XS/SB, in that order.

    Per target module of shape (m, n):
    - LoRA trains B (m x r) and A (r x n): r * (m + n).
    - VeRA shares frozen random A, B across layers and trains a scaling vector d (r) and b (m)
      per module: r_vera + m. This is the LoRA-XS paper's eq. (6), L * q * (n + r) for square
      W; with r_vera = 256 on RoBERTa-large q, v it gives Table 1's 61,440 ("61K").
    - LoRA-XS and LoRA-SB train only R (r x r): r^2, independent of the model's width.
    Full fine-tuning counts `total_params` when given (the whole model), otherwise the sum of
    m * n over the shapes passed: pass every linear layer, not just the targets, to get a
    meaningful figure that way.

    `rank` is the LoRA-XS rank; `lora_rank` and `vera_rank` default to it, because the papers
    compare methods at different ranks (LoRA r=8 vs VeRA r=256 vs LoRA-XS r=25). A LoRA-XS rank
    above min(m, n) of any module is refused: the truncated SVD has no more directions.
    """
    if not shapes:
        raise BadInputError("no target modules to estimate: check --targets against the model's modules")
    rank = _positive(rank, "rank")
    lora_rank = _positive(rank if lora_rank is None else lora_rank, "LoRA rank")
    vera_rank = _positive(rank if vera_rank is None else vera_rank, "VeRA rank")
    dtype_bytes = _positive(dtype_bytes, "bytes per element")
    for s in shapes:
        _positive(s.out_features, f"out_features of {s.name}")
        _positive(s.in_features, f"in_features of {s.name}")
        if rank > min(s.out_features, s.in_features):
            raise BadInputError(
                f"rank {rank} exceeds min(out, in) = {min(s.out_features, s.in_features)} of module "
                f"{s.name} ({s.out_features}x{s.in_features}); use a rank of at most that"
            )
    if total_params is not None:
        total_params = _positive(total_params, "total parameter count")

    full = total_params if total_params is not None else sum(s.out_features * s.in_features for s in shapes)
    lora = sum(lora_rank * (s.out_features + s.in_features) for s in shapes)
    vera = sum(vera_rank + s.out_features for s in shapes)
    xs = len(shapes) * rank * rank
    return [
        MethodEstimate(FULL, None, full, full * dtype_bytes),
        MethodEstimate(LORA, lora_rank, lora, lora * dtype_bytes),
        MethodEstimate(VERA, vera_rank, vera, vera * dtype_bytes),
        MethodEstimate(LORA_XS, rank, xs, xs * dtype_bytes),
    ]


def bytes_for_users(e: MethodEstimate, users: int) -> int:
    """Storage for one adapter per user, the paper's serving scenario (base model not counted)."""
    if isinstance(users, bool) or not isinstance(users, int) or users < 0:
        raise BadInputError(f"number of users must be a non-negative integer, got {users!r}")
    return e.bytes * users


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: int) -> str:
    """Binary units with one decimal ("144.0 MiB"), plain integer below 1 KiB ("512 B").

    Binary, because the paper's "144MB" per GPT-3 LoRA checkpoint is exactly 144 MiB.
    """
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1024:
        return f"{sign}{int(value)} B"
    unit = 0
    # Step up while the value would print as 1024.0 or more, so 1023.99 KiB reads "1.0 MiB".
    while unit < len(_UNITS) - 1 and round(value, 1) >= 1024:
        value /= 1024
        unit += 1
    return f"{sign}{value:.1f} {_UNITS[unit]}"


@dataclass(frozen=True)
class Preset:
    """Shape table of a model whose config is not on disk (the papers' models).

    `modules` maps a short name to (out, in) per layer; `paths` maps it to the module's path
    inside a layer, so names match the real model (`model.layers.0.self_attn.q_proj`);
    `prefix` is the layer container, formatted with the layer index. `target_aliases` adds
    extra accepted spellings (e.g. "q" for "query").
    """

    name: str
    layers: int
    modules: dict[str, tuple[int, int]] = field(hash=False)
    default_targets: tuple[str, ...]
    total_params: int
    aliases: tuple[str, ...]
    prefix: str = "layers.{i}"
    paths: dict[str, str] = field(default_factory=dict, hash=False)
    target_aliases: dict[str, str] = field(default_factory=dict, hash=False)
    note: str = ""

    def _lookup(self) -> dict[str, str]:
        table: dict[str, str] = {}
        for short in self.modules:
            table[short.lower()] = short
            table[self.paths.get(short, short).lower()] = short
        for alias, short in self.target_aliases.items():
            table[alias.lower()] = short
        return table

    def resolve_targets(self, targets: Sequence[str] | None = None) -> list[str]:
        """Canonical short names, in the table's order, deduplicated; "all-linear" means all."""
        if targets is None or len(targets) == 0:
            return list(self.default_targets)
        table = self._lookup()
        wanted: set[str] = set()
        for t in targets:
            key = t.strip().lower()
            if key in ("all", "all-linear"):
                wanted.update(self.modules)
            elif key in table:
                wanted.add(table[key])
            else:
                valid = ", ".join(self.modules)
                extra = ", ".join(sorted(self.target_aliases))
                raise BadInputError(
                    f"unknown target {t!r} for preset {self.name}; valid targets: {valid}"
                    + (f" (aliases: {extra}; or all-linear)" if extra else " (or all-linear)")
                )
        return [short for short in self.modules if short in wanted]

    def shapes(self, targets: Sequence[str] | None = None) -> list[ModuleShape]:
        """One ModuleShape per layer and target, layer by layer; no targets means the defaults."""
        chosen = self.resolve_targets(targets)
        out: list[ModuleShape] = []
        for i in range(self.layers):
            prefix = self.prefix.format(i=i)
            for short in chosen:
                m, n = self.modules[short]
                out.append(ModuleShape(f"{prefix}.{self.paths.get(short, short)}", m, n))
        return out


def _decoder(
    name: str,
    layers: int,
    hidden: int,
    q_out: int,
    kv_out: int,
    intermediate: int,
    total_params: int,
    aliases: tuple[str, ...],
) -> Preset:
    """Llama-family decoder (Llama, Mistral, Gemma): seven projections per layer, HF names."""
    modules = {
        "q_proj": (q_out, hidden),
        "k_proj": (kv_out, hidden),
        "v_proj": (kv_out, hidden),
        "o_proj": (hidden, q_out),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }
    paths = {k: f"self_attn.{k}" for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
    paths.update({k: f"mlp.{k}" for k in ("gate_proj", "up_proj", "down_proj")})
    short = {
        "q": "q_proj",
        "k": "k_proj",
        "v": "v_proj",
        "o": "o_proj",
        "gate": "gate_proj",
        "up": "up_proj",
        "down": "down_proj",
    }
    return Preset(
        name=name,
        layers=layers,
        modules=modules,
        # The LoRA-XS paper's instruction-tuning setup: all seven projections.
        default_targets=tuple(modules),
        total_params=total_params,
        aliases=aliases,
        prefix="model.layers.{i}",
        paths=paths,
        target_aliases=short,
    )


def _roberta(
    name: str, layers: int, hidden: int, ffn: int, total_params: int, aliases: tuple[str, ...]
) -> Preset:
    """RoBERTa encoder with HF names; "output.dense" is the FFN output `layer.N.output.dense`."""
    modules = {
        "query": (hidden, hidden),
        "key": (hidden, hidden),
        "value": (hidden, hidden),
        "attention.output.dense": (hidden, hidden),
        "intermediate.dense": (ffn, hidden),
        "output.dense": (hidden, ffn),
    }
    paths = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
    }
    short = {
        "q": "query",
        "k": "key",
        "v": "value",
        "attn-out": "attention.output.dense",
        "o": "attention.output.dense",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
    }
    return Preset(
        name=name,
        layers=layers,
        modules=modules,
        default_targets=("query", "value"),  # LoRA and VeRA's GLUE setup
        total_params=total_params,  # RobertaModel with pooler, no task head
        aliases=aliases,
        prefix="roberta.encoder.layer.{i}",
        paths=paths,
        target_aliases=short,
    )


_D = 12288  # GPT-3 175B d_model; d_ff = 4 * d_model
_GPT3 = Preset(
    name="GPT-3 175B",
    layers=96,
    modules={
        "q": (_D, _D),
        "k": (_D, _D),
        "v": (_D, _D),
        "o": (_D, _D),
        "fc1": (4 * _D, _D),
        "fc2": (_D, 4 * _D),
    },
    default_targets=("q", "v"),  # the LoRA paper's GPT-3 setup, as in the LoRA-XS serving example
    # 96 * (12 d^2 + 13 d) + (50257 + 2048) * d + 2 d: weights, biases, layer norms, tied embeddings.
    total_params=174_604_259_328,
    aliases=("gpt3", "gpt-3", "gpt3-175b", "gpt-3-175b", "gpt-3 175b", "davinci"),
    prefix="layers.{i}",  # weights are not public: the names only illustrate
    paths={
        "q": "attn.q_proj",
        "k": "attn.k_proj",
        "v": "attn.v_proj",
        "o": "attn.out_proj",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    },
    target_aliases={
        "query": "q",
        "key": "k",
        "value": "v",
        "q_proj": "q",
        "k_proj": "k",
        "v_proj": "v",
        "o_proj": "o",
        "out_proj": "o",
        "attn-out": "o",
    },
    note="GPT-3 weights are not public; module names are illustrative.",
)

PRESETS: dict[str, Preset] = {
    "gpt3-175b": _GPT3,
    "roberta-large": _roberta(
        "RoBERTa-large", 24, 1024, 4096, 355_359_744, ("roberta-large", "facebookai/roberta-large")
    ),
    "roberta-base": _roberta(
        "RoBERTa-base", 12, 768, 3072, 124_645_632, ("roberta-base", "facebookai/roberta-base")
    ),
    # 32 query heads, 8 key/value heads of 128: k, v are 1024 x 4096 (grouped-query attention).
    "mistral-7b": _decoder(
        "Mistral-7B-v0.1",
        layers=32,
        hidden=4096,
        q_out=4096,
        kv_out=1024,
        intermediate=14336,
        total_params=7_241_732_096,
        aliases=("mistral-7b", "mistral-7b-v0.1", "mistral7b", "mistralai/mistral-7b-v0.1"),
    ),
    # 16 heads of 256 = 4096 > hidden 3072, 16 kv heads; tied embeddings (vocab 256000).
    "gemma-7b": _decoder(
        "Gemma-7B",
        layers=28,
        hidden=3072,
        q_out=4096,
        kv_out=4096,
        intermediate=24576,
        total_params=8_537_680_896,
        aliases=("gemma-7b", "gemma7b", "google/gemma-7b"),
    ),
    "llama-2-7b": _decoder(
        "Llama-2-7B",
        layers=32,
        hidden=4096,
        q_out=4096,
        kv_out=4096,
        intermediate=11008,
        total_params=6_738_415_616,
        aliases=(
            "llama-2-7b",
            "llama2-7b",
            "llama-2-7b-hf",
            "meta-llama/llama-2-7b-hf",
            "meta-llama/llama-2-7b",
        ),
    ),
}


def _norm(name: str) -> str:
    return "-".join(name.strip().lower().replace("_", "-").split())


def find_preset(name: str) -> Preset | None:
    """The preset for a model name or hub id, case-insensitive; None when there is none.

    A hub id "org/name" falls back to "name", so re-uploads of the same architecture match;
    a local path (more than one "/" or starting with "." or "/") only matches an exact alias.
    """
    key = _norm(name)
    table: dict[str, Preset] = {}
    for k, p in PRESETS.items():
        table[_norm(k)] = p
        table[_norm(p.name)] = p
        for a in p.aliases:
            table[_norm(a)] = p
    if key in table:
        return table[key]
    if key.count("/") == 1 and not key.startswith((".", "/")):
        return table.get(key.split("/", 1)[1])
    return None


def preset_names() -> list[str]:
    """The names `inspect` accepts for the built-in presets, in table order."""
    return list(PRESETS)


def unknown_preset_message(name: str) -> str:
    """One line for a name that is neither a path, a cached hub model nor a preset."""
    import difflib

    close = difflib.get_close_matches(_norm(name), preset_names(), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return (
        f"{name}: no such model directory, preset or cached Hugging Face model; {hint}"
        f"presets: {', '.join(preset_names())}"
    )
