"""The shared, content-addressed factor cache.

Layout (README "The factor cache"):

    $LORAXS_HOME/factors/<base-slug>--<fingerprint>/<method>-r<r_max>-<recipe-hash>/
        factors.safetensors   "<module>.A", "<module>.B" (and "<module>.S" for LoRA-SB), float32
        meta.json             method, recipe, r_max, modules, per-module energy, sha256, ...
    $LORAXS_HOME/factors/.locks/<base>--<recipe-hash>.lock

The recipe hash covers everything that changes the factors except the rank, so an entry at r_max
serves every r <= r_max (and every subset of its modules). A larger rank makes a new entry instead
of replacing the old one: adapters trained on the old entry keep working. Entries are written to a
temporary directory and renamed into place; the file's sha256 is recorded and checked on load.

meta.json is not covered by that sha256, so what it claims is checked against the tensors' own
shapes and names (`FactorEntry.layout_problem`): an edited r_max or module list makes the entry
damaged, never an adapter that every later command refuses. Entry ids (which adapters record) are
two plain names under the cache root, never a path that leads outside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .envvars import env_number
from .errors import BadInputError
from .fingerprint import sha256_file
from .fsutil import TEMP_PATTERN, atomic_dir, clean_stale_temps, loads_json, require_regular_file, safe_name
from .paths import factors_root

FACTORS_FILE = "factors.safetensors"
META_FILE = "meta.json"
FORMAT_VERSION = 1
DEFAULT_LOCK_TIMEOUT_S = 6 * 3600.0
# `.tmp-<entry>-PID-HEX`: an entry being written (the pid names its writer)
ENTRY_TEMP = re.compile(r"^\.tmp-.+-(?P<pid>\d+)-[0-9a-f]+$")
_FACTOR_PARTS = ("A", "B", "S")


def lock_timeout() -> float:
    """Seconds to wait for another process computing the same factors (LORAXS_LOCK_TIMEOUT)."""
    return env_number("LORAXS_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S, minimum=0, unit="seconds")


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
    """One cached factor set on disk.

    The entry keeps the factors it last loaded (and verified) in memory, with the file's identity:
    a later `load` of the same or fewer components and modules by the same process (train saving an
    adapter with --embed-factors at the end of a run) is served from there, so it still works after
    `cache rm` removed the files meanwhile; a file replaced on disk is read again."""

    path: Path
    meta: dict
    _loaded: dict = field(default_factory=dict, repr=False, compare=False)

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
        if not self.file.exists():
            return f"{FACTORS_FILE} is missing"
        try:
            require_regular_file(self.file, "factors file")
        except BadInputError:
            return f"{FACTORS_FILE} is not a regular file"
        actual = sha256_file(self.file)
        if actual != self.sha256:
            return f"sha256 mismatch ({actual[:12]} != {self.sha256[:12]}): truncated or altered"
        return self._layout_problem_of_file()

    def check_layout(self) -> None:
        """Refuse (one line, exit 3) an entry whose meta.json its tensors contradict; reads only the
        safetensors header. A missing file is left to `check` and `load`."""
        if self.file.exists() and self._layout_problem_of_file():
            self.check()  # the full check names the problem best (a truncated file: its sha256)
            raise BadInputError(self._damaged(self._layout_problem_of_file() or "unreadable"))

    def _layout_problem_of_file(self) -> str | None:
        try:
            require_regular_file(self.file, "factors file")
        except BadInputError:
            return f"{FACTORS_FILE} is not a regular file"
        try:
            with safe_open(str(self.file), framework="pt") as handle:
                return self.layout_problem(handle)
        except (SafetensorError, OSError, ValueError) as error:
            return f"{FACTORS_FILE} is unreadable ({str(error).splitlines()[0]})"

    def layout_problem(self, handle) -> str | None:
        """What in meta.json the tensors contradict (None: nothing): the modules must be exactly those
        of the file, each with A (r_max x n), B (m x r_max) and, for LoRA-SB, S (r_max)."""
        keys = set(handle.keys())
        parts: dict[str, set[str]] = {}
        for key in keys:
            module, _, part = key.rpartition(".")
            parts.setdefault(module, set()).add(part)
        declared = set(self.modules)
        if len(declared) != len(self.modules):
            return f"{META_FILE} lists a module twice"
        if declared != set(parts):
            odd = sorted(declared ^ set(parts))[0]
            where = f"not in {FACTORS_FILE}" if odd in declared else f"not in {META_FILE}"
            return f"{META_FILE} and {FACTORS_FILE} disagree on the modules ({odd} is {where})"
        r = self.r_max
        for module in sorted(declared):
            if not {"A", "B"} <= parts[module] or not parts[module] <= set(_FACTOR_PARTS):
                return f"{module}: {FACTORS_FILE} holds {sorted(parts[module])}, not A and B"
            a = list(handle.get_slice(f"{module}.A").get_shape())
            b = list(handle.get_slice(f"{module}.B").get_shape())
            s = list(handle.get_slice(f"{module}.S").get_shape()) if "S" in parts[module] else [r]
            if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r or s != [r]:
                return (
                    f"{META_FILE} says r_max {r}, but {module} has A {tuple(a)} and B {tuple(b)} "
                    f"(expected A ({r}, n), B (m, {r}))"
                )
        return None

    def _file_identity(self) -> tuple | None:
        try:
            st = os.stat(self.file)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def check(self) -> None:
        problem = self.verify()
        if problem:
            raise BadInputError(self._damaged(problem))

    def load(self, rank: int, modules: Sequence[str] | None = None, *, verify: bool = True) -> dict:
        """{module: {"A": (r, n), "B": (m, r)[, "S": (r,)]}} for the leading `rank` components."""
        wanted = list(modules) if modules is not None else self.modules
        kept = self._from_memory(rank, wanted)
        if kept is not None:
            return kept
        identity = self._file_identity()
        if verify:
            self.check()  # first: an edited meta.json is a damaged entry, whatever was asked of it
        else:
            require_regular_file(self.file, "factors file")
        if rank > self.r_max:
            raise BadInputError(f"rank {rank} exceeds this factor set's r_max {self.r_max} ({self.id})")
        missing = sorted(set(wanted) - set(self.modules))
        if missing:
            raise BadInputError(f"factor set {self.id} has no factors for {', '.join(missing[:3])}")
        out: dict[str, dict[str, torch.Tensor]] = {}
        try:
            with safe_open(str(self.file), framework="pt") as handle:
                problem = self.layout_problem(handle)
                if problem:
                    raise BadInputError(self._damaged(problem))
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
        if verify and identity is not None:
            self._loaded = {"identity": identity, "rank": rank, "factors": out}
        return out

    def _from_memory(self, rank: int, wanted: list[str]) -> dict | None:
        """What an earlier verified load kept, if it covers this request and the file on disk is the
        one it read or is gone (removed by `cache rm` since)."""
        kept = self._loaded
        if not kept or rank > kept["rank"] or not set(wanted) <= set(kept["factors"]):
            return None
        identity = self._file_identity()
        if identity is not None and identity != kept["identity"]:
            return None
        return {
            name: {k: (v[:, :rank] if k == "B" else v[:rank]) for k, v in kept["factors"][name].items()}
            for name in wanted
        }

    def _damaged(self, problem: str) -> str:
        return (
            f"factor cache entry {self.id} is damaged: {problem}; "
            f"remove it with `loraxs cache rm {self.id}` and run `loraxs init` again"
        )


def _read_meta(path: Path) -> dict | None:
    """The entry's meta.json, or None when it is unreadable or malformed (then it is not an entry)."""
    try:
        meta = loads_json((path / META_FILE).read_text())
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
        best.check_layout()  # a hit on an edited meta.json is refused here, not after training
        best.touch()
        return best

    def get(self, entry_id: str) -> FactorEntry | None:
        """An entry by its id `<base-dir>/<recipe-dir>`: exactly two plain names, neither hidden, so
        an id read from an adapter (an absolute path, `..`, a temporary) never leads outside the cache."""
        if not valid_entry_id(entry_id):
            return None
        path = self.root / entry_id
        if not path.is_dir():
            return None
        meta = _read_meta(path)
        return FactorEntry(path, meta) if meta else None

    def lock(self, slug: str, fingerprint: str, recipe: Recipe) -> FileLock:
        lock_dir = self.root / ".locks"
        self._ensure_writable(lock_dir)
        # filelock's lock is released by the OS when its process dies, so a killed run
        # leaves no stale lock behind.
        return FileLock(str(lock_dir / f"{slug}--{fingerprint}--{recipe.hash}.lock"), timeout=lock_timeout())

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
        """Write a new entry atomically: temp directory, permissions, fsync, rename (fsutil.atomic_dir)."""
        base = self.base_dir(slug, fingerprint)
        self._ensure_writable(base)
        self._clean_dead_writers(base)
        final = base / f"{recipe.method}-r{rank}-{recipe.hash}"
        temp = base / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # ENTRY_TEMP
        try:
            # An existing entry is replaced only when recomputing on purpose (--force).
            with atomic_dir(final, temp=temp) as tmp:
                full_meta = self._write_entry(tmp, recipe, rank, tensors, meta)
        except OSError as error:
            raise BadInputError(
                f"cannot write to the factor cache {base}: {error.strerror or error}"
            ) from error
        return FactorEntry(final, full_meta)

    @staticmethod
    def _write_entry(tmp: Path, recipe: Recipe, rank: int, tensors: dict, meta: dict) -> dict:
        """The files of an entry, in the directory `tmp`; returns its metadata."""
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / FACTORS_FILE))
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
        return full_meta

    def remove(self, entry: FactorEntry) -> None:
        shutil.rmtree(entry.path)
        base = entry.path.parent
        if not any(self._dirs(base)):
            shutil.rmtree(base, ignore_errors=True)

    def clean_stale_temps(self, max_age_s: float = 3600) -> int:
        """Remove temporary directories left by killed writers: those whose writer (the pid in the
        name) is gone, and any older than `max_age_s`."""
        removed = 0
        now = time.time()
        for base in self._dirs(self.root):
            removed += self._clean_dead_writers(base)
            for tmp in self._dirs(base):
                if tmp.name.startswith(".tmp-") and now - tmp.stat().st_mtime > max_age_s:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
        return removed

    @staticmethod
    def _clean_dead_writers(base: Path) -> int:
        return len(clean_stale_temps(base, ENTRY_TEMP)) + len(clean_stale_temps(base, TEMP_PATTERN))


def valid_entry_id(entry_id: object) -> bool:
    """`<base-dir>/<recipe-dir>`: two plain, visible path components."""
    if not isinstance(entry_id, str):
        return False
    parts = entry_id.split("/")
    if len(parts) != 2:
        return False
    try:
        return all(safe_name(part) and not part.startswith(".") for part in parts)
    except BadInputError:
        return False


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
