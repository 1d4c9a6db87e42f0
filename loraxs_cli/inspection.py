"""What `loraxs inspect` sizes: the target modules of a model, from a preset or its config alone.

A local model, a config.json or a hub id is built on the meta device (no weights are read); its
linear modules are matched against the targets as training would match them.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BadInputError
from .estimate import ModuleShape, find_preset, unknown_preset_message
from .models import linear_modules, load_config, match_targets, parse_targets, resolve_config_only, skeleton

# Bytes per stored number of an adapter, by the names `--dtype` takes (and torch's).
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1}


def target_shapes(target: str, targets: str | None) -> tuple[str, list[ModuleShape], int]:
    """(display name, shapes of the target modules, total parameters) of a preset, a local model
    or config, or a hub id; `targets` as `--targets` takes them (None: the architecture's default)."""
    wanted = parse_targets(targets)
    path = Path(target).expanduser()
    preset = None if path.exists() else find_preset(target)
    if preset is not None:
        return preset.name, preset.shapes(wanted), preset.total_params
    try:
        resolved = resolve_config_only(target)
    except BadInputError:
        if path.exists() or "/" in target:
            raise
        # A bare name that is no preset: most likely a mistyped preset, not a hub id.
        raise BadInputError(unknown_preset_message(target)) from None
    config = load_config(resolved)
    meta_model = skeleton(config)
    modules = linear_modules(meta_model)
    names = match_targets(modules, wanted, config.model_type)
    shapes = [ModuleShape(n, modules[n].out_features, modules[n].in_features) for n in names]
    total = sum(p.numel() for p in meta_model.parameters())
    return resolved.spec, shapes, total
