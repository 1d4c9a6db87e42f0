"""The shared, content-addressed factor cache.

Layout (DESIGN.md section 2):

    $LORAXS_HOME/factors/<base-slug>--<fingerprint>/<method>-r<r_max>-<recipe-hash>/
        factors.safetensors   "<module>.A", "<module>.B" (and "<module>.S" for LoRA-SB), float32
        meta.json             method, recipe, r_max, modules, per-module energy, sha256, ...
    $LORAXS_HOME/factors/.locks/<base>--<recipe-hash>.lock

The recipe hash covers everything that changes the factors except the rank, so an entry at r_max
serves every r <= r_max (and every subset of its modules). A larger rank makes a new entry instead
of replacing the old one: adapters trained on the old entry keep working. Entries are written to a
temporary directory and renamed into place; the file's sha256 is recorded and checked on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from .errors import BadInputError
from .fingerprint import sha256_file
from .paths import factors_root

FACTORS_FILE = "factors.safetensors"
META_FILE = "meta.json"
FORMAT_VERSION = 1
LOCK_TIMEOUT_S = float(os.environ.get("LORAXS_LOCK_TIMEOUT", 6 * 3600))


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a factor set apart from the base weights and the rank."""

    method: str  # "xs" or "sb"
    modules: tuple[str, ...]  # backbone-relative module names
    svd: dict  # SVDSettings.as_dict()
    weights_dtype: str  # the dtype the base weights were read in
    extra: dict = field(default_factory=dict)  # LoRA-SB: data sha256, samples, eta, ...

    def key(self) -> dict:
        return {
            "method": self.method,
            "modules": sorted(self.modules),
            "svd": self.svd,
            "weights_dtype": self.weights_dtype,
            "extra": self.extra,
        }

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:12]

    def settings_key(self) -> dict:
        """The recipe without the module list: entries with more modules can still serve."""
        return {k: v for k, v in self.key().items() if k != "modules"}


@dataclass
class FactorEntry:
    """One cached factor set on disk."""

    path: Path
    meta: dict

    @property
    def id(self) -> str:
        """`<base-dir>/<recipe-dir>`: how adapters and the CLI name an entry."""
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def r_max(self) -> int:
        return int(self.meta["r_max"])

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]

    @property
    def modules(self) -> list[str]:
        return list(self.meta["modules"])

    @property
    def file(self) -> Path:
        return self.path / FACTORS_FILE

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def last_used(self) -> float:
        return self.path.stat().st_mtime

    def touch(self) -> None:
        # Last-use time is informational; a read-only cache still serves.
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def verify(self) -> str | None:
        """None if the entry is intact, otherwise what is wrong (one line)."""
        if not self.file.is_file():
            return f"{FACTORS_FILE} is missing"
        actual = sha256_file(self.file)
        if actual != self.sha256:
            return f"sha256 mismatch ({actual[:12]} != {self.sha256[:12]}): truncated or altered"
        return None

    def check(self) -> None:
        problem = self.verify()
        if problem:
            raise BadInputError(
                f"factor cache entry {self.id} is damaged: {problem}; "
                f"remove it with `loraxs cache rm {self.id}` and run `loraxs init` again"
            )

    def load(self, rank: int, modules: Sequence[str] | None = None, *, verify: bool = True) -> dict:
        """{module: {"A": (r, n), "B": (m, r)[, "S": (r,)]}} for the leading `rank` components."""
        from safetensors import SafetensorError, safe_open

        if rank > self.r_max:
            raise BadInputError(f"rank {rank} exceeds this factor set's r_max {self.r_max} ({self.id})")
        if verify:
            self.check()
        wanted = list(modules) if modules is not None else self.modules
        missing = sorted(set(wanted) - set(self.modules))
        if missing:
            raise BadInputError(f"factor set {self.id} has no factors for {', '.join(missing[:3])}")
        out: dict[str, dict[str, torch.Tensor]] = {}
        try:
            with safe_open(str(self.file), framework="pt") as handle:
                keys = set(handle.keys())
                for name in wanted:
                    parts = {
                        "A": handle.get_slice(f"{name}.A")[:rank],
                        "B": handle.get_slice(f"{name}.B")[:, :rank],
                    }
                    if f"{name}.S" in keys:
                        parts["S"] = handle.get_slice(f"{name}.S")[:rank]
                    out[name] = parts
        except (SafetensorError, OSError) as error:
            raise BadInputError(f"factor cache entry {self.id} is unreadable: {error}") from error
        return out


def _read_meta(path: Path) -> dict | None:
    """The entry's meta.json, or None when it is unreadable or malformed (then it is not an entry)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if _well_formed(meta) else None


def _well_formed(meta) -> bool:
    if not isinstance(meta, dict):
        return False
    modules = meta.get("modules")
    return (
        type(meta.get("r_max")) is int
        and meta["r_max"] > 0
        and isinstance(meta.get("sha256"), str)
        and isinstance(modules, list)
        and all(isinstance(m, str) for m in modules)
    )


class FactorCache:
    """The cache directory, with lookup, atomic insertion and listing."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else factors_root()

    def base_dir(self, slug: str, fingerprint: str) -> Path:
        return self.root / f"{slug}--{fingerprint}"

    def entries(self, base_dir: Path | None = None) -> Iterator[FactorEntry]:
        bases = (
            [base_dir] if base_dir else sorted(p for p in self._dirs(self.root) if not p.name.startswith("."))
        )
        for base in bases:
            for entry_dir in sorted(self._dirs(base)):
                if entry_dir.name.startswith("."):
                    continue  # temporary directories of writes in progress or killed
                meta = _read_meta(entry_dir)
                if meta is not None:
                    yield FactorEntry(entry_dir, meta)

    @staticmethod
    def _dirs(path: Path) -> list[Path]:
        try:
            return [p for p in path.iterdir() if p.is_dir()]
        except OSError:
            return []

    def find(self, slug: str, fingerprint: str, recipe: Recipe, rank: int) -> FactorEntry | None:
        """The smallest entry of this base that matches the recipe, covers its modules and rank."""
        wanted = set(recipe.modules)
        candidates = [
            entry
            for entry in self.entries(self.base_dir(slug, fingerprint))
            if entry.meta.get("recipe_settings") == recipe.settings_key()
            and entry.r_max >= rank
            and wanted <= set(entry.modules)
        ]
        if not candidates:
            return None
        best = min(candidates, key=lambda e: (e.r_max, len(e.modules)))
        best.touch()
        return best

    def get(self, entry_id: str) -> FactorEntry | None:
        """An entry by its id `<base-dir>/<recipe-dir>`."""
        path = self.root / entry_id
        if ".." in Path(entry_id).parts or not path.is_dir():
            return None
        meta = _read_meta(path)
        return FactorEntry(path, meta) if meta else None

    def lock(self, slug: str, fingerprint: str, recipe: Recipe) -> FileLock:
        lock_dir = self.root / ".locks"
        self._ensure_writable(lock_dir)
        # filelock's lock is released by the OS when its process dies, so a killed run
        # leaves no stale lock behind.
        return FileLock(str(lock_dir / f"{slug}--{fingerprint}--{recipe.hash}.lock"), timeout=LOCK_TIMEOUT_S)

    def _ensure_writable(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise BadInputError(
                f"factor cache {self.root} is not writable ({error.strerror or error}); "
                "set LORAXS_HOME to a writable directory"
            ) from error

    def insert(
        self,
        slug: str,
        fingerprint: str,
        recipe: Recipe,
        rank: int,
        tensors: dict[str, torch.Tensor],
        meta: dict,
    ) -> FactorEntry:
        """Write a new entry atomically: temp directory, fsync, rename."""
        from safetensors.torch import save_file

        base = self.base_dir(slug, fingerprint)
        self._ensure_writable(base)
        final = base / f"{recipe.method}-r{rank}-{recipe.hash}"
        tmp = base / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / FACTORS_FILE))
            _fsync(tmp / FACTORS_FILE)
            full_meta = {
                "format_version": FORMAT_VERSION,
                **meta,
                "method": recipe.method,
                "r_max": rank,
                "modules": list(recipe.modules),
                "recipe": recipe.key(),
                "recipe_hash": recipe.hash,
                "recipe_settings": recipe.settings_key(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "sha256": sha256_file(tmp / FACTORS_FILE),
            }
            (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2))
            _fsync(tmp / META_FILE)
            if final.exists():
                shutil.rmtree(final)  # only reached when recomputing on purpose (--force)
            os.rename(tmp, final)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BadInputError(
                f"cannot write to the factor cache {base}: {error.strerror or error}"
            ) from error
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return FactorEntry(final, full_meta)

    def remove(self, entry: FactorEntry) -> None:
        shutil.rmtree(entry.path)
        base = entry.path.parent
        if not any(self._dirs(base)):
            shutil.rmtree(base, ignore_errors=True)

    def clean_stale_temps(self, max_age_s: float = 3600) -> int:
        """Remove temporary directories left by killed writers (older than `max_age_s`)."""
        removed = 0
        now = time.time()
        for base in self._dirs(self.root):
            for tmp in self._dirs(base):
                if tmp.name.startswith(".tmp-") and now - tmp.stat().st_mtime > max_age_s:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
        return removed


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def get_or_compute(
    cache: FactorCache,
    slug: str,
    fingerprint: str,
    recipe: Recipe,
    rank: int,
    compute: Callable[[], tuple[dict[str, torch.Tensor], dict]],
    *,
    force: bool = False,
) -> tuple[FactorEntry, bool]:
    """Return (entry, hit). Computes under the recipe's lock so two processes never both compute."""
    if not force:
        entry = cache.find(slug, fingerprint, recipe, rank)
        if entry is not None:
            return entry, True
    lock = cache.lock(slug, fingerprint, recipe)
    try:
        with lock:
            if not force:
                entry = cache.find(slug, fingerprint, recipe, rank)  # another process may have finished
                if entry is not None:
                    return entry, True
            tensors, meta = compute()
            return cache.insert(slug, fingerprint, recipe, rank, tensors, meta), False
    except Timeout as error:
        raise BadInputError(f"timed out waiting for the factor cache lock {lock.lock_file}") from error
