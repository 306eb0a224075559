"""What the processing classes share about their JSON files: which keyword arguments say where to
find them (the rest override their keys), and the layout they are written in."""

from __future__ import annotations

import json
from typing import Any

HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")


def pop_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Removes the hub options (revision, cache_dir, local_files_only, token) from `kwargs` and returns them."""
    return {key: kwargs.pop(key) for key in list(kwargs) if key in HUB_KWARGS}


def json_text(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
