"""Finding model files: a local directory, a Hugging Face cache snapshot, or a download.

The cache layout is huggingface_hub's: `<cache>/models--org--name/{refs/<branch>, snapshots/<commit>/,
.no_exist/<commit>/<file>}`. The cache folder is `cache_dir`, else $HF_HUB_CACHE, else $HF_HOME/hub,
else ~/.cache/huggingface/hub. Offline (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1 or
local_files_only=True) nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ModelNotFoundError(FileNotFoundError):
    """Raised with the list of places that were searched."""


def hub_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache folder, by huggingface_hub's rules."""
    if cache_dir:
        return Path(cache_dir)
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def is_offline() -> bool:
    return any(os.environ.get(v, "0").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _repo_folder(repo_id: str, cache_dir) -> Path:
    return hub_cache(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def _commit(repo: Path, revision: str) -> str:
    """A branch or tag name resolves through refs/; anything else is taken as a commit hash."""
    ref = repo / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else revision


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` (a branch, tag or commit) in the HF cache layout."""
    repo = _repo_folder(repo_id, cache_dir)
    snapshot = repo / "snapshots" / _commit(repo, revision or "main")
    return snapshot if snapshot.is_dir() else None


def _known_missing(repo_id: str, revision: str | None, cache_dir, filename: str) -> bool:
    """huggingface_hub records files a repo lacks under .no_exist/<commit>/."""
    repo = _repo_folder(repo_id, cache_dir)
    return (repo / ".no_exist" / _commit(repo, revision or "main") / filename).exists()


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | None = None,
    required: bool = True,
    subfolder: str = "",
) -> Path | None:
    """Returns the local path of `filename` for a model directory or hub id.

    Order: a local directory; the HF cache snapshot; a download through huggingface_hub
    unless offline (HF_HUB_OFFLINE=1 or local_files_only). With `required=False` a missing
    file gives None; otherwise the error lists what was tried, where.
    """
    if not os.fspath(name_or_path):
        raise ModelNotFoundError("the model name or path is empty")
    if subfolder:
        filename = f"{str(subfolder).strip('/')}/{filename}"  # the hub's layout and a folder's alike
    path = Path(name_or_path)
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate
        if not required:
            return None
        raise ModelNotFoundError(f"{filename} not found in model directory {path}")
    tried = [f"local directory {path} (does not exist)"]

    repo_id = os.fspath(name_or_path)
    if not _REPO_ID.match(repo_id):
        raise ModelNotFoundError(f"{repo_id!r} is neither an existing directory nor a hub id (org/name); "
                                 "tried: " + "; ".join(tried))
    where = hub_cache(cache_dir)
    snapshot = cached_snapshot(repo_id, revision, cache_dir)
    if snapshot is not None and (snapshot / filename).is_file():
        return snapshot / filename
    if snapshot is not None:
        tried.append(f"HF cache snapshot {snapshot} (no {filename})")
    else:
        tried.append(f"HF cache {where} (no snapshot of {repo_id} at revision {revision or 'main'})")

    if _known_missing(repo_id, revision, cache_dir, filename):
        if not required:
            return None
        tried.append(f"the cache records that {repo_id} has no {filename} at revision {revision or 'main'}")
        raise ModelNotFoundError(f"could not find {filename} for {repo_id!r}; tried: " + "; ".join(tried))
    if local_files_only or is_offline():
        if not required:
            return None
        why = "local_files_only=True" if local_files_only else "offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
        tried.append(f"download skipped: {why}")
        raise ModelNotFoundError(f"could not find {filename} for {repo_id!r}; tried: " + "; ".join(tried))
    return _download(repo_id, filename, revision, cache_dir, token, required, tried)


def _download(repo_id, filename, revision, cache_dir, token, required, tried) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token))
    except EntryNotFoundError:
        if not required:
            return None
        tried.append(f"hub repo {repo_id} has no file {filename}")
    except Exception as err:  # network errors, unknown repos or revisions, auth
        if not required:
            return None
        tried.append(f"download from the hub failed: {type(err).__name__}: {err}")
    raise ModelNotFoundError(f"could not find {filename} for {repo_id!r}; tried: " + "; ".join(tried))


def read_json(path: str | os.PathLike) -> dict:
    """A model file's JSON object; a broken file gives a ValueError that names it."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
