"""Adapter packs: thousands of adapters in one safetensors file.

    PACK.safetensors
        "<name>/<module>.R"            each adapter's R (float32), as in its adapter.safetensors
        "<name>/head.<param>"          its task head, if any
        "__factors__/<hash>/<module>.<A|B|S>"   embedded factors, stored once per distinct set
        metadata "loraxs_pack": JSON index {format_version, adapters: {name: {config, sha256, factors}}}

A member is named `PACK.safetensors::NAME` (this module owns that address: `split_member`,
`load_source`) and is accepted wherever an adapter directory is (sources.py, the command line's
adapter specs). Each member's sha256 (over its tensors' names, dtypes, shapes and bytes)
is checked when it is read, so a damaged pack is refused rather than half-used. Reading a member
touches only its own tensors (safetensors reads lazily).

Member names become directory names (`unpack` writes OUT/NAME), so a name is one plain path
component (fsutil.safe_name): checked when packing, when an index is read (a hostile or damaged
index with `../x` or `/etc/x` is refused before anything is written) and when unpacking.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter import (
    Adapter,
    AdapterConfig,
    flat_factors,
    group_factors,
    load_adapter,
    save_adapter,
    tensors_sha256,
)
from .errors import BadInputError, UsageError
from .fsutil import atomic_path, check_output, loads_json, require_regular_file, safe_name

MEMBER_SEPARATOR = "::"
INDEX_KEY = "loraxs_pack"
FACTORS_PREFIX = "__factors__/"
PACK_VERSION = 1


def valid_member_name(name: object) -> bool:
    """A member name is one plain path component (it becomes OUT/NAME) without '::', '=' or a
    leading '__' (the pack's own prefixes)."""
    try:
        safe_name(name)
    except BadInputError:
        return False
    assert isinstance(name, str)
    return MEMBER_SEPARATOR not in name and "=" not in name and not name.startswith("__")


def check_name(name: str) -> str:
    """A member name given on the command line (NAME=DIR, or a directory's name): a usage error."""
    if not valid_member_name(name):
        raise UsageError(
            f"{name!r} cannot name a pack member: one plain name, no '/', '\\', '..', '::', '=', "
            "control characters or leading '__'"
        )
    return name


def source_path(spec: str | Path) -> Path:
    """The file or directory an adapter spec reads: PACK for `PACK::NAME`, else the spec itself."""
    member = split_member(spec)
    return Path(member[0] if member is not None else spec)


def split_member(spec: str | Path) -> tuple[str, str] | None:
    """(pack path, member name) for `PACK::NAME`, else None."""
    text = str(spec)
    if MEMBER_SEPARATOR not in text:
        return None
    pack, _, name = text.rpartition(MEMBER_SEPARATOR)
    return pack, name


def member_spec(pack: str | Path, name: str) -> str:
    """The address `PACK::NAME` of one member."""
    return f"{pack}{MEMBER_SEPARATOR}{name}"


def load_source(spec: str | Path) -> Adapter:
    """One adapter: a pack member `PACK::NAME`, else an adapter directory."""
    member = split_member(spec)
    return load_member(*member) if member is not None else load_adapter(spec)


def read_index(path: str | Path) -> dict:
    require_regular_file(path, "adapter pack")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise BadInputError(f"{path}: not a readable safetensors file ({error})".splitlines()[0]) from error
    if INDEX_KEY not in metadata:
        raise BadInputError(f"{path}: not a loraxs adapter pack (no index); make one with `loraxs pack`")
    try:
        index = loads_json(metadata[INDEX_KEY])
    except ValueError as error:
        raise BadInputError(f"{path}: damaged pack index ({error})") from error
    version = index.get("format_version") if isinstance(index, dict) else None
    if not isinstance(version, int) or version > PACK_VERSION:
        raise BadInputError(f"{path}: unsupported pack format {version!r}; upgrade loraxs")
    if not _well_formed(index.get("adapters")):
        raise BadInputError(f"{path}: damaged pack index (malformed member entries); pack the adapters again")
    bad = [name for name in index["adapters"] if not valid_member_name(name)]
    if bad:
        raise BadInputError(
            f"{path}: damaged or hostile pack index: member name {bad[0]!r} is not one plain name "
            "(it would be written outside --out); nothing was read, pack the adapters again"
        )
    return index


def _well_formed(adapters) -> bool:
    """Every member entry has a config object, a sha256 string and a factors key (string or null)."""
    return isinstance(adapters, dict) and all(
        isinstance(entry, dict)
        and isinstance(entry.get("config"), dict)
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("factors"), str | None)
        for entry in adapters.values()
    )


def is_pack_file(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        read_index(path)
    except BadInputError:
        return False
    return True


def pack_names(path: str | Path) -> list[str]:
    return list(read_index(path)["adapters"])


def pack_adapters(named: Sequence[tuple[str, str]], out: str | Path, *, force: bool = False) -> dict:
    """Write the adapters (name, directory or pack member) into one pack file, atomically."""
    if not named:
        raise UsageError("no adapters to pack")
    for name, _ in named:
        check_name(name)
    sources = {f"the adapter {name!r}": source_path(source) for name, source in named}
    out = check_output(out, sources, force=force)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, source in named:
        check_name(name)
        if name in entries:
            raise UsageError(f"two adapters are named {name!r}: name them apart with NAME=DIR")
        adapter = load_source(source)
        own = {f"{m}.R": adapter.R[m].float().contiguous() for m in adapter.config.modules}
        own.update({f"head.{k}": v.contiguous() for k, v in adapter.head.items()})
        factors_key = _add_factors(tensors, adapter.factors)
        tensors.update({f"{name}/{k}": v for k, v in own.items()})
        config = loads_json(adapter.config.to_json())
        entries[name] = {"config": config, "sha256": tensors_sha256(own), "factors": factors_key}
    index = {"format_version": PACK_VERSION, "adapters": entries}
    metadata = {"format": "loraxs-pack", INDEX_KEY: json.dumps(index, separators=(",", ":"))}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return {"pack": str(out), "adapters": len(entries), "bytes": out.stat().st_size}


def _add_factors(tensors: dict, factors: dict | None) -> str | None:
    """Embedded factors go in once per distinct set; return their key."""
    if factors is None:
        return None
    flat = flat_factors(factors)
    key = tensors_sha256(flat)[:16]
    tensors.update({f"{FACTORS_PREFIX}{key}/{k}": v for k, v in flat.items()})
    return key


def load_member(pack: str | Path, name: str) -> Adapter:
    """One adapter of a pack as an Adapter (path `PACK::NAME`), its sha256 verified."""
    return load_members(pack, [name])[0]


def load_members(pack: str | Path, names: Sequence[str]) -> list[Adapter]:
    """Several members, opening the pack once (thousands of adapters load in seconds)."""
    pack = Path(pack)
    if not pack.exists():
        raise BadInputError(f"{pack}: no such adapter pack")
    index = read_index(pack)
    for name in names:
        if name not in index["adapters"]:
            known = ", ".join(list(index["adapters"])[:5])
            raise BadInputError(f"{pack}: no adapter named {name!r} in this pack (it holds {known}, ...)")
    try:
        with safe_open(str(pack), framework="pt") as handle:
            factor_sets: dict[str, dict] = {}
            return [_read_member(handle, pack, name, index["adapters"][name], factor_sets) for name in names]
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BadInputError(f"{pack}: damaged pack ({error})".splitlines()[0]) from error


def _read_member(handle, pack: Path, name: str, entry: dict, factor_sets: dict) -> Adapter:
    source = member_spec(pack, name)
    config = AdapterConfig.from_dict(entry["config"], source)
    keys = [f"{m}.R" for m in config.modules] + [f"head.{h}" for h in config.head]
    own = {k: handle.get_tensor(f"{name}/{k}") for k in keys}
    if tensors_sha256(own) != entry.get("sha256"):
        raise BadInputError(f"{source}: sha256 mismatch, the pack is damaged; pack the adapter again")
    bad = [m for m in config.modules if tuple(own[f"{m}.R"].shape) != (config.rank, config.rank)]
    if bad:
        raise BadInputError(f"{source}: lacks a {config.rank}x{config.rank} R for {bad[0]}")
    factors = None
    key = entry.get("factors")
    if key:
        if key not in factor_sets:
            prefix = f"{FACTORS_PREFIX}{key}/"
            flat = {k[len(prefix) :]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}  # noqa: SIM118
            if tensors_sha256(flat)[: len(key)] != key:  # the key is the sha256 of the factors
                raise BadInputError(f"{source}: sha256 mismatch of its factors, the pack is damaged")
            factor_sets[key] = group_factors(flat)
        factors = factor_sets[key]
    R = {m: own[f"{m}.R"].float() for m in config.modules}
    head = {k[len("head.") :]: v for k, v in own.items() if k.startswith("head.")}
    return Adapter(Path(source), config, R, head, factors)


def unpack(pack: str | Path, out_dir: str | Path, names: Sequence[str] = (), *, force: bool = False):
    """Write members (all by default) back as adapter directories OUT_DIR/NAME.

    Every target is checked before the first is written: a plain name (the index is validated when
    read), not the pack itself nor around it, and not existing without `force`."""
    available = pack_names(pack)
    wanted = list(names) or available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise BadInputError(f"{pack}: no adapter named {unknown[0]!r} in this pack")
    out_dir = Path(out_dir).expanduser()
    targets = [check_output(out_dir / name, {"the pack": pack}, force=force) for name in wanted]
    written = []
    for adapter, target in zip(load_members(pack, wanted), targets, strict=True):
        save_adapter(target, adapter.config, adapter.R, head=adapter.head, factors=adapter.factors)
        written.append(str(target))
    return written
