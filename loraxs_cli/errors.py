"""Error types that the CLI turns into one-line messages and documented exit codes.

The core raises these; `cli/app.py` catches them. Anything else is a bug and gets a
traceback only with LORAXS_DEBUG=1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INCOMPATIBLE = 4
EXIT_DIVERGED = 5
EXIT_INTERRUPTED = 130


class LoraxsError(Exception):
    """Base of all user-facing errors: the message says what is wrong and how to fix it."""

    exit_code = 1


class UsageError(LoraxsError):
    """Options that contradict each other or cannot be parsed."""

    exit_code = EXIT_USAGE


class BadInputError(LoraxsError):
    """A missing model, malformed data, a rank out of range, a damaged file."""

    exit_code = EXIT_BAD_INPUT


class MissingFactorsError(BadInputError):
    """An adapter's frozen factors are neither embedded nor in the factor cache (exit 3, bad input):
    the adapter is fine, its factors must be recomputed (`loraxs init`, same recipe) or embedded."""


class IncompatibleError(LoraxsError):
    """An adapter, base model and factor set that do not belong together."""

    exit_code = EXIT_INCOMPATIBLE


class DivergedError(LoraxsError):
    """Training produced a NaN or infinite loss."""

    exit_code = EXIT_DIVERGED
