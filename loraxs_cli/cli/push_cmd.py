"""`loraxs push ADAPTER REPO_ID`: an adapter and its model card to the Hugging Face Hub."""

from __future__ import annotations

import typer

from .options import JsonOption, QuietOption, VerboseOption
from .output import get_output, handle_errors
from .render import Fields


@handle_errors
def push(
    ctx: typer.Context,
    adapter: str = typer.Argument(
        ..., help="An adapter directory (RUN/adapter, RUN/best), or a Hub adapter ORG/NAME or ORG/NAME@REV."
    ),
    repo_id: str = typer.Argument(..., help="The model repo to push to, ORG/NAME (created when missing)."),
    private: bool = typer.Option(
        False, "--private", help="Create the repo private (an existing public repo is refused, not changed)."
    ),
    revision: str | None = typer.Option(
        None, "--revision", help="The branch to push to (created from main when missing); default: main."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="List what would be uploaded (files, sizes, the card's front matter); no token, no network.",
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        help="A Hugging Face token with write access (default: HF_TOKEN, else `hf auth login`'s).",
    ),
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Upload an adapter to a Hugging Face model repo in one commit, with a model card from its config."""
    out = get_output(ctx)
    from ..push import plan_push, push_token, run_push

    plan = plan_push(adapter, repo_id, revision=revision, private=private)
    if not dry_run:
        token = push_token(token)  # no token, or offline: one line before anything else is said
    for note in plan.notes:  # a card without base_model is worth a warning; a replaced card a note
        if "base_model" in note:
            out.warn(note)
        else:
            out.info(note)
    if dry_run:
        out.result({"dry_run": True, **plan.document()}, lambda doc: _view(doc, plan.card, dry_run=True))
        return
    out.detail(f"pushing {len(plan.files)} files to {plan.repo_id} ...")
    done = run_push(plan, token)
    out.result({"dry_run": False, **done}, lambda doc: _view(doc, plan.card, dry_run=False))


def _view(doc: dict, card: str, *, dry_run: bool) -> list:
    where = doc["repo_id"] + (f" (branch {doc['revision']})" if doc["revision"] else "")
    where += ", private" if doc["private"] else ""
    width = max(len(f["path"]) for f in doc["files"]) + 2
    rows: list = [(f["path"], f"{f['bytes']:>12,} bytes") for f in doc["files"]]
    rows.append(("total", f"{doc['bytes']:>12,} bytes"))
    if doc["skipped"]:
        rows.append(f"  not uploaded (not part of the adapter): {', '.join(doc['skipped'])}")
    heading = (
        f"would push {doc['adapter']} to {where} (dry run: nothing uploaded)"
        if dry_run
        else f"pushed {doc['adapter']} to {where}: {doc.get('commit_url') or doc.get('url')}"
    )
    front = card.split("\n---\n", 1)[0] + "\n---"  # the front matter block as the card has it
    return [Fields(heading, rows, width=width), "model card front matter (README.md):", front]
