"""Finding model files: a local directory, a Hugging Face cache snapshot, or a download."""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """Raised with the list of places that were searched."""


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` (a branch, tag or commit) in the HF cache layout."""
    root = Path(cache_dir) if cache_dir else _hub_cache()
    repo = root / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | None = None,
    required: bool = True,
) -> Path | None:
    """Returns the local path of `filename` for a model directory or hub id.

    Order: a local directory; the HF cache snapshot; a download through huggingface_hub
    unless offline (HF_HUB_OFFLINE=1 or local_files_only). The error lists what was tried.
    """
    tried: list[str] = []
    path = Path(name_or_path)
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate
        if not required:
            return None
        raise ModelNotFoundError(f"{filename} not found in model directory {path}")
    tried.append(f"local directory {path} (does not exist)")

    repo_id = str(name_or_path)
    if repo_id.count("/") > 1 or not repo_id or repo_id.startswith((".", "/")):
        raise ModelNotFoundError(f"{repo_id!r} is neither an existing directory nor a hub id; tried: " + "; ".join(tried))
    snapshot = cached_snapshot(repo_id, revision, cache_dir)
    where = Path(cache_dir) if cache_dir else _hub_cache()
    if snapshot is not None:
        if (snapshot / filename).is_file():
            return snapshot / filename
        tried.append(f"HF cache snapshot {snapshot} (no {filename})")
    else:
        tried.append(f"HF cache {where} (no snapshot of {repo_id} at revision {revision or 'main'})")

    if local_files_only or _offline():
        if not required:
            return None
        tried.append("download skipped: offline (HF_HUB_OFFLINE=1 or local_files_only=True)")
        raise ModelNotFoundError(f"could not find {filename} for {repo_id!r}; tried: " + "; ".join(tried))
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token))
    except EntryNotFoundError:
        if not required:
            return None
        tried.append(f"hub repo {repo_id} has no file {filename}")
    except Exception as err:  # network errors, unknown repos, auth
        tried.append(f"download from the hub failed: {type(err).__name__}: {err}")
        if not required:
            return None
    raise ModelNotFoundError(f"could not find {filename} for {repo_id!r}; tried: " + "; ".join(tried))
