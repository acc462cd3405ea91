"""Reaching the Hugging Face Hub: the endpoint, cache and offline switches read at call time, and one-line errors
for failed downloads. (Publishing is :mod:`surgeon.io.push`.)"""

from __future__ import annotations

import os

from surgeon.errors import CheckpointError, SurgeonError, first_line


class HubError(SurgeonError):
    """A Hub operation failed; the message says what and how to fix it."""


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def hub_cache() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_error(exc: Exception, source: str) -> CheckpointError:
    """One line for a failed download of ``source`` (``hf-hub:org/name``): not cached while offline, or why the
    Hub refused."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        return CheckpointError(f"{source}: not in the local cache and the Hub cannot be reached (network down or "
                               "HF_HUB_OFFLINE=1); connect or download it first")
    return CheckpointError(str(explain(exc, "cannot download", source)))


def explain(exc: Exception, action: str, repo_id: str) -> HubError:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = first_line(exc) or type(exc).__name__
    if status in (401, 403):
        return HubError(f"{action} {repo_id}: not authorised ({status}); pass a write token with --token or "
                        "HF_TOKEN, or run `hf auth login`")
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return HubError(f"{action} {repo_id}: repository not found (or your token cannot see it)")
    if status is not None and status >= 500:
        return HubError(f"{action} {repo_id}: the Hub answered {status} ({first}); nothing was committed - "
                        "retry later")
    if isinstance(exc, HfHubHTTPError):
        return HubError(f"{action} {repo_id}: {first}")
    return HubError(f"{action} {repo_id}: cannot reach the Hub ({first}); check the network, or unset "
                    "HF_HUB_OFFLINE")
