"""`loraxs push`: an adapter directory to a model repo on the Hugging Face Hub, with its model card.

Through huggingface_hub's HfApi: create_repo (exist_ok), create_branch for `--revision`, then one
upload_folder commit of the adapter's files and the card rendered from its config (adapter.default_card,
the card `train` writes), so the repo gets all of it or, when the commit fails, none of it. The
adapter directory itself is never written: the upload is staged in a temporary directory of links.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .adapter import (
    CARD_FILE,
    CONFIG_FILE,
    EMBEDDED_FACTORS_FILE,
    WEIGHTS_FILE,
    Adapter,
    card_base_name,
    default_card,
    is_adapter_dir,
    load_adapter,
)
from .errors import BadInputError, LoraxsError, UsageError
from .models import hub_offline
from .pack import is_pack_file, split_member
from .paths import split_name
from .sources import hub_adapter_dir, hub_spec

# The files of the adapter format that go to the Hub (the card is rendered, not copied).
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, EMBEDDED_FACTORS_FILE)


@dataclass
class PushPlan:
    """What `push` uploads: the files (name in the repo, bytes; the card last), the card, and notes."""

    spec: str
    source: Path  # the adapter directory
    adapter: Adapter
    repo_id: str
    revision: str | None
    private: bool
    card: str
    files: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what else the directory holds (not uploaded)
    notes: list[str] = field(default_factory=list)

    @property
    def front_matter(self) -> dict:
        """The card's metadata as huggingface_hub reads it back (ModelCard)."""
        from huggingface_hub import ModelCard

        return ModelCard(self.card).data.to_dict()

    @property
    def base_model(self) -> str | None:
        return self.front_matter.get("base_model")

    def document(self) -> dict:
        return {
            "adapter": self.spec,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "private": self.private,
            "files": [{"path": name, "bytes": size} for name, size in self.files],
            "bytes": sum(size for _, size in self.files),
            "skipped": self.skipped,
            "card": self.front_matter,
            "base_model": self.base_model,
            "notes": self.notes,
        }


def plan_push(spec: str, repo_id: str, *, revision: str | None = None, private: bool = False) -> PushPlan:
    """Check the adapter (load_adapter: config and tensor sha256) and the repo id, and render the card.
    Reads nothing from the network for a local directory."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"REPO_ID {repo_id!r} is not a Hugging Face repo id (ORG/NAME): {error}") from None
    if revision is not None and (not revision.strip() or revision != revision.strip()):
        raise UsageError(f"--revision {revision!r}: a branch name without spaces around it")
    source = _adapter_dir(spec)
    adapter = load_adapter(source)
    if adapter.origin is None and hub_spec(spec):
        adapter.origin = spec
    card = default_card(adapter.config, head_params=adapter.head_params, repo_id=repo_id, revision=revision)
    files = [(name, (source / name).stat().st_size) for name in ADAPTER_FILES if (source / name).is_file()]
    files.append((CARD_FILE, len(card.encode())))
    skipped = sorted(p.name for p in source.iterdir() if p.name not in (*ADAPTER_FILES, CARD_FILE))
    plan = PushPlan(spec, source, adapter, repo_id, revision, private, card, files, skipped)
    base, local = card_base_name(adapter.config.base)
    if local:
        plan.notes.append(
            f"no Hugging Face Hub id is known for the base (the local model {base!r}): the card names no "
            "base_model; train from the base's hub id (or a path into the Hugging Face cache) to have it"
        )
    own = source / CARD_FILE  # as `train` wrote it, unless edited since or written by an older loraxs
    written = default_card(adapter.config, head_params=adapter.head_params)
    if own.is_file() and own.read_text(encoding="utf-8", errors="replace") != written:
        plan.notes.append(
            f"{CARD_FILE}: the directory's own card is not the one loraxs writes (edited, or an older "
            f"loraxs); the Hub gets the card rendered from {CONFIG_FILE} instead"
        )
    return plan


def _adapter_dir(spec: str) -> Path:
    """The directory `push` uploads: an adapter directory, or a Hub adapter's snapshot (ORG/NAME[@REV])."""
    if split_name(spec)[0] is not None or split_member(spec) is not None or is_pack_file(spec):
        raise UsageError(
            f"{spec}: push takes one adapter directory; write a pack member out first with "
            "`loraxs unpack PACK --name NAME --out DIR`"
        )
    hub = hub_spec(spec)
    path = hub_adapter_dir(spec, hub) if hub else Path(spec)
    if path.is_dir() and not is_adapter_dir(path):
        runs = [f"{path / name}" for name in ("adapter", "best") if is_adapter_dir(path / name)]
        if runs:
            raise BadInputError(f"{spec}: a run directory; push its adapter: {' or '.join(runs)}")
    return path


def push_token(token: str | None = None) -> str:
    """The token a push sends: `token`, else huggingface_hub's (HF_TOKEN, then `hf auth login`'s
    file). Refused before any request, with one line, when there is none or HF_HUB_OFFLINE is set."""
    from huggingface_hub import get_token

    if hub_offline():
        raise BadInputError(
            "push needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it to push "
            "(--dry-run shows what would be uploaded without the network)"
        )
    token = token or get_token()
    if not token:
        raise BadInputError(
            "push needs a Hugging Face token with write access: log in with `hf auth login`, set HF_TOKEN "
            "or pass --token (--dry-run needs none)"
        )
    return token


def run_push(plan: PushPlan, token: str | None = None) -> dict:
    """Create the repo (and branch) if missing and upload the plan in one commit. Without a token or
    with HF_HUB_OFFLINE set it stops before any request (push_token); every failure is one line."""
    from huggingface_hub import HfApi

    api = HfApi(token=push_token(token))
    what = f"{plan.repo_id}" + (f" (branch {plan.revision})" if plan.revision else "")
    try:
        url = api.create_repo(plan.repo_id, repo_type="model", private=plan.private or None, exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or plan.repo_id
        if plan.private and not getattr(api.repo_info(repo_id, repo_type="model"), "private", False):
            raise BadInputError(
                f"{repo_id} exists and is public: --private does not change an existing repo; make it "
                "private in its settings on the Hub first, or push without --private. Nothing was uploaded"
            )
        if plan.revision:
            api.create_branch(repo_id, branch=plan.revision, repo_type="model", exist_ok=True)
        config = plan.adapter.config
        with _staged(plan) as folder:
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                revision=plan.revision,
                commit_message=f"Upload a LoRA-{config.method.upper()} adapter, rank {config.rank} (loraxs)",
            )
    except (LoraxsError, OSError):  # ours, or the local file system's (cli.output says which)
        raise
    except Exception as error:
        raise BadInputError(push_problem(what, error)) from error
    return {
        **plan.document(),
        "repo_id": repo_id,
        "url": str(url),
        "commit_url": getattr(commit, "commit_url", None),
        "commit": getattr(commit, "oid", None),
    }


@contextmanager
def _staged(plan: PushPlan) -> Iterator[Path]:
    """A temporary directory with links to the adapter's files and the rendered card: what one
    upload_folder commit takes (it follows the links), leaving the adapter directory as it is."""
    with tempfile.TemporaryDirectory(prefix="loraxs-push-") as tmp:
        folder = Path(tmp)
        for name, _ in plan.files:
            if name == CARD_FILE:
                (folder / name).write_text(plan.card, encoding="utf-8")
                continue
            target = (plan.source / name).resolve()
            try:
                os.symlink(target, folder / name)
            except OSError:  # no symlinks here (some file systems, Windows without the privilege)
                shutil.copy2(target, folder / name)
        yield folder


def _transport_errors() -> tuple[type[Exception], ...]:
    """The network failures of huggingface_hub's HTTP client (httpx2 from its 2.x, httpx in 1.x)."""
    for name in ("httpx2", "httpx"):
        try:
            return (importlib.import_module(name).TransportError,)
        except (ImportError, AttributeError):
            continue
    return ()


def push_problem(what: str, error: Exception) -> str:
    """One line for a push the Hub did not take: why, and what to do."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, (OfflineModeIsEnabled, *_transport_errors())):
        return (
            f"push to {what}: the Hugging Face Hub cannot be reached ({type(error).__name__}); check the "
            "network or proxy. Nothing was uploaded"
        )
    if status == 401:
        return (
            f"push to {what}: the Hub refused the token (HTTP 401); log in again with `hf auth login` "
            "or set HF_TOKEN. Nothing was uploaded"
        )
    if status == 403:
        return (
            f"push to {what}: the token may not write there (HTTP 403); use a token with write access to "
            "that namespace. Nothing was uploaded"
        )
    if isinstance(error, RepositoryNotFoundError):
        return f"push to {what}: the Hub knows no such repo or cannot show it to this token"
    if isinstance(error, HfHubHTTPError):
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"push to {what}: the Hub answered HTTP {status} ({detail}). Nothing was uploaded"
    reason = f"{type(error).__name__}: {error}".splitlines()[0]
    return f"push to {what} failed ({reason})"
