"""`--device`: the one parser every command uses (init, train, eval, generate).

A device string torch cannot parse, a device type loraxs does not run on, or a CUDA index this
machine does not have is bad input (exit 3) before any work, in one line instead of torch's traceback.
"""

from __future__ import annotations

import torch

from .errors import BadInputError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_device(spec: str | None, *, default: str = "auto") -> torch.device:
    """The torch device for `--device SPEC`; without one, `default` ("auto": the GPU when there is
    one, else the CPU; or a device string such as "cpu")."""
    if spec is None or not str(spec).strip():
        if default == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        spec = default
    text = str(spec).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise BadInputError(f"--device {text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise BadInputError(f"--device {text!r}: loraxs runs on {', '.join(DEVICE_TYPES)}, not {device.type}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise BadInputError(f"--device {text}: {count} CUDA device(s) available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInputError(f"--device {text}: MPS is not available here; use --device cpu")
    return device


def check_device(spec: str | None) -> None:
    """Refuse a bad `--device` before any work (None: the default, always valid)."""
    if spec is not None:
        parse_device(spec)
