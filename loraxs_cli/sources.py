"""Adapter sources: every way the command line names adapters, resolved into named, loaded adapters.

    DIR             an adapter directory, named by its last component (a run's `adapter/` or `best/`:
                    by the run directory, runs/alice/adapter -> alice)
    NAME=DIR        the same, named NAME (paths.split_name says when `X=Y` is a path)
    PACK            a pack file (pack.py): all its members, each named by its member name
    PACK::NAME      one member of a pack, named NAME (NAME2=PACK::NAME renames it)
    ORG/NAME[@REV]  an adapter repo on the Hugging Face Hub at a branch, tag or commit (default main),
                    named NAME: resolved through huggingface_hub's cache (snapshot_download: HF_HOME,
                    HF_HUB_CACHE, HF_HUB_OFFLINE=1 reads the cache only), then loaded as a directory.
                    A local path that exists always wins; NAME2=ORG/NAME@REV renames it.

Every command that takes adapters (eval, generate, inspect, merge, convert, pack) resolves them here,
so each spec form works everywhere. Commands that take one adapter use `load_one` (a pack then has to
hold exactly one member, or be named PACK::NAME). Each pack is opened once however many of its
members are named; a missing member is a one-line error naming some that exist.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .adapter import (
    CARD_FILE,
    CONFIG_FILE,
    EMBEDDED_FACTORS_FILE,
    WEIGHTS_FILE,
    Adapter,
    check_base,
    is_adapter_dir,
    load_adapter,
)
from .errors import BadInputError, UsageError
from .pack import (
    MEMBER_SEPARATOR,
    is_pack_file,
    load_members,
    load_source,
    member_spec,
    pack_names,
    read_index,
    source_path,
    split_member,
)
from .paths import factors_root, split_name

__all__ = [
    "RUN_ADAPTER_DIRS",
    "Source",
    "check_bases",
    "default_name",
    "hub_adapter_dir",
    "hub_spec",
    "input_paths",
    "is_adapter_spec",
    "load_adapters",
    "load_one",
    "load_sources",
    "parse_specs",
    "source_path",
    "spec_path",
    "split_member",
]

# What `loraxs train` writes in a run directory: such an adapter is named after the run.
RUN_ADAPTER_DIRS = ("adapter", "best")

# ORG/NAME[@REVISION]: a Hub repo id (huggingface_hub validates it further) and a branch, tag or commit.
_HUB_SPEC = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
# What an adapter repo holds that loraxs reads (adapter_config.json only to say it is a PEFT adapter).
HUB_ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, EMBEDDED_FACTORS_FILE, CARD_FILE, "adapter_config.json")


@dataclass(frozen=True)
class Source:
    """One adapter the command line names: its name and what to read (DIR or PACK::NAME; for a Hub
    adapter its snapshot directory, `origin` being ORG/NAME[@REV])."""

    name: str
    spec: str
    origin: str | None = None

    @property
    def path(self) -> Path:
        """The file or directory it reads (the pack for a member)."""
        return source_path(self.spec)


def is_adapter_spec(spec: str | Path) -> bool:
    """Whether `spec` names loraxs adapters (a directory, a pack, a member) rather than a model."""
    text = split_name(str(spec))[1]
    return split_member(text) is not None or is_adapter_dir(text) or is_pack_file(text)


def spec_path(spec: str | Path) -> Path:
    """The file or directory one spec reads (the pack of a member, a Hub adapter's snapshot
    directory; NAME= left out)."""
    given = split_name(str(spec))[1]
    hub = hub_spec(given)
    return hub_adapter_dir(given, hub) if hub else source_path(given)


def hub_spec(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `text` names an adapter on the Hugging Face Hub, ORG/NAME[@REV], and
    no local path (a path that exists always wins); else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if MEMBER_SEPARATOR in text or text.startswith((".", "/", "~")) or Path(text).expanduser().exists():
        return None
    match = _HUB_SPEC.fullmatch(text)
    if match is None:
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return match["repo"], match["revision"]


def hub_adapter_dir(text: str, hub: tuple[str, str | None]) -> Path:
    """The local snapshot directory of the Hub adapter `text` = ORG/NAME[@REV] (hub_spec gives `hub`),
    through huggingface_hub's snapshot_download with its own rules: the cache when HF_HUB_OFFLINE is
    set or the Hub cannot be reached, else the revision as the Hub has it now. Any failure is one line
    (models.hub_problem), as is a repo that holds no loraxs adapter."""
    from huggingface_hub import snapshot_download

    from .models import hub_offline, hub_problem

    repo_id, revision = hub
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_ADAPTER_FILES)))
    except Exception as error:
        problem = hub_problem(
            repo_id,
            revision,
            error,
            offline=hub_offline(),
            what="adapter",
            revision_flag=f"the @REVISION of {text}",
            instead="give an adapter directory",
        )
        why = problem.removeprefix(f"{repo_id}: ")
        raise BadInputError(f"{text}: no such adapter directory; as a Hugging Face repo: {why}") from error
    if not is_adapter_dir(folder):
        peft = (folder / "adapter_config.json").is_file()
        hint = " (a PEFT adapter: download it, then `loraxs convert DIR --from peft-lora`)" if peft else ""
        raise BadInputError(f"{text}: the Hugging Face repo has no {CONFIG_FILE}: not a loraxs adapter{hint}")
    return folder


def default_name(source: str) -> str:
    """The name of an adapter given without NAME=: a pack member's member name, else the directory's
    name, except a run's `adapter/` or `best/` (runs/alice/adapter -> alice)."""
    member = split_member(source)
    if member is not None:
        return member[1]
    hub = hub_spec(source)
    if hub is not None:  # ORG/NAME@REV -> NAME
        return hub[0].rpartition("/")[2]
    path = Path(source)
    if path.name in RUN_ADAPTER_DIRS and path.parent.name not in ("", ".", ".."):
        return path.parent.name
    if path.name in RUN_ADAPTER_DIRS:  # ./adapter: the run is the current directory
        return path.resolve().parent.name
    return path.name


def parse_specs(specs: Sequence[str], *, unique: bool = True) -> list[Source]:
    """One Source per adapter the specs name (a pack file alone stands for all its members). With
    `unique` (names that prompts or pack members go by), two adapters with one name are refused,
    naming both."""
    sources: list[Source] = []
    for spec in specs:
        name, given = split_name(str(spec))  # NAME=DIR, unless the whole spec is a path
        if split_member(given) is None and is_pack_file(given):
            if name is not None:
                raise UsageError(
                    f"{spec}: NAME= names one adapter, but the pack {given} holds {len(pack_names(given))}; "
                    f"name one member with NAME={given}{MEMBER_SEPARATOR}MEMBER"
                )
            sources += [Source(member, member_spec(given, member)) for member in pack_names(given)]
            continue
        hub = hub_spec(given)
        if hub is not None:
            sources.append(Source(name or default_name(given), str(hub_adapter_dir(given, hub)), given))
            continue
        sources.append(Source(name or default_name(given), given))
    seen: dict[str, str] = {}
    for source in sources:
        if not source.name and split_member(source.spec) is None:  # a member's name: the pack's to check
            raise UsageError(f"adapter {source.spec!r} has no name: use NAME={source.spec}")
        if unique and source.name in seen:
            raise UsageError(
                f"two adapters are named {source.name!r} ({seen[source.name]} and {source.spec}): "
                f"name them apart with NAME=DIR, e.g. {source.name}-2={source.spec}"
            )
        seen.setdefault(source.name, source.spec)
    return sources


def load_sources(sources: Sequence[Source]) -> list[Adapter]:
    """The adapters, in order; the members of each pack are read with one opening of the pack."""
    wanted: dict[str, list[str]] = {}  # pack -> member names
    for source in sources:
        member = split_member(source.spec)
        if member is not None:
            wanted.setdefault(member[0], []).append(member[1])
    members: dict[str, Adapter] = {}
    for pack, names in wanted.items():
        unique = list(dict.fromkeys(names))
        members.update(zip((member_spec(pack, n) for n in unique), load_members(pack, unique), strict=True))
    adapters = [members.get(source.spec) or _load_dir(source.spec) for source in sources]
    for source, adapter in zip(sources, adapters, strict=True):
        if source.origin:
            adapter.origin = source.origin
    return adapters


def _load_dir(spec: str) -> Adapter:
    """An adapter directory; a file that is not one says why (not a pack, a damaged one...)."""
    if Path(spec).is_file():
        read_index(spec)  # raises what is wrong with it as a pack
        raise BadInputError(f"{spec}: a pack, not an adapter directory")  # pragma: no cover
    return load_adapter(spec)


def load_adapters(specs: Sequence[str], *, unique: bool = True) -> tuple[list[str], list[Adapter]]:
    """(names, adapters) for the specs (see parse_specs)."""
    sources = parse_specs(specs, unique=unique)
    return [s.name for s in sources], load_sources(sources)


def load_one(spec: str | Path) -> Adapter:
    """The one adapter a single-adapter command (inspect, merge, convert) names: DIR, NAME=DIR,
    PACK::NAME, or a pack that holds exactly one member."""
    text = str(spec)
    if split_member(text) is not None or Path(text).is_dir():
        return load_source(text)
    sources = parse_specs([text])
    if len(sources) != 1:
        names = ", ".join(s.name for s in sources[:5])
        raise UsageError(
            f"{text} holds {len(sources)} adapters ({names}{', ...' if len(sources) > 5 else ''}); "
            f"name one with {text}{MEMBER_SEPARATOR}NAME"
        )
    return load_sources(sources)[0]


def input_paths(specs: Sequence[str], *, unique: bool = True) -> dict[str, Path]:
    """What the adapters read, by label ("the adapter 'alice'"), for an --out overlap check
    (fsutil.check_output), and the factor cache they may read."""
    inputs = {f"the adapter {s.name!r}": s.path for s in parse_specs(specs, unique=unique)}
    inputs["the factor cache"] = factors_root()
    return inputs


def check_bases(adapters: Sequence[Adapter], base, spec: str | None = None) -> None:
    """Refuse (exit 4) any adapter trained on another base than `base` (initialize.BaseInfo)."""
    for adapter in adapters:
        check_base(adapter, base.fingerprint, spec or base.resolved.spec)
