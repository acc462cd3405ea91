"""The ``push`` command: upload an artifact with a model card to the Hugging Face Hub."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from surgeon.cli.common import JsonOpt, friendly_errors, progress, stdout


@friendly_errors
def push(directory: Annotated[Path, typer.Argument(help="Artifact directory (converted, adapted or merged).")],
         repo_id: Annotated[str, typer.Argument(help="Hub repository, org/name.")],
         private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
         create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of "
                                                                     "committing to the branch.")] = False,
         revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to.")] = None,
         token: Annotated[str | None, typer.Option("--token", help="Hub token (default: HF_TOKEN / login).")] = None,
         commit_message: Annotated[str | None, typer.Option("--commit-message", "-m")] = None,
         overwrite_card: Annotated[bool, typer.Option("--overwrite-card", help="Replace an existing README.md "
                                                                               "on the Hub.")] = False,
         dry_run: Annotated[bool, typer.Option("--dry-run", help="List exactly the files that would be sent, "
                                                                 "and send nothing.")] = False,
         json_output: JsonOpt = False) -> None:
    """Upload an artifact with a model card to the Hugging Face Hub (load it back with hf-hub:REPO_ID)."""
    from surgeon.io.push import push_to_hub

    if not sys.stderr.isatty():  # huggingface_hub's own progress bars would garble logs and one-line errors
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    with progress(f"uploading to {repo_id}"):
        result = push_to_hub(directory, repo_id, private=private, create_pr=create_pr, revision=revision,
                             token=token, commit_message=commit_message, overwrite_card=overwrite_card,
                             dry_run=dry_run)
    if json_output:
        print(json.dumps({"schema": "surgeon.push/1", "dry_run": dry_run, "repo_url": result.repo_url,
                          "commit_url": result.commit_url, "pull_request_url": result.pull_request_url,
                          "card_written": result.card_written, "files": result.files}, indent=2))
        return
    if dry_run:
        stdout.print(f"would push to {repo_id} (nothing sent):", markup=False)
        for name in result.files:
            stdout.print(f"  {name}" + ("  (model card, generated)" if name == "README.md" else ""), markup=False)
        return
    stdout.print(f"pushed {directory} to {result.repo_url} ({result.commit_url})", markup=False)
    if not result.card_written:
        stdout.print("kept the README.md already on the Hub (use --overwrite-card to replace it)", markup=False)
