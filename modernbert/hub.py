"""Where a checkpoint lives: a local folder, or a Hugging Face Hub repo id fetched (or found in the
cache) by huggingface_hub."""

from __future__ import annotations

import os
from pathlib import Path

# What from_pretrained and the tokenizer read; weights in other formats are not fetched.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def offline() -> bool:
    """HF_HUB_OFFLINE read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "on", "yes", "true")


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            local_files_only: bool = False) -> Path:
    """The local folder of ``name_or_path``: itself when it is a folder, else the snapshot of the
    Hub repo of that id at ``revision`` (downloaded into ``cache_dir``, or only looked up there
    when offline: ``local_files_only`` or HF_HUB_OFFLINE=1)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not _is_repo_id(name) or path.is_absolute() or name.startswith("."):
        raise FileNotFoundError(f"no config.json in {name}: no such folder, and not a Hub repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=CHECKPOINT_FILES,
                                      local_files_only=local_files_only or offline()))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        where = ("in the cache (offline)" if local_files_only or offline()
                 else "in the cache, and the Hub cannot be reached (no network?)")
        raise FileNotFoundError(f"cannot find {name!r}{f' at revision {revision!r}' if revision else ''} {where}; "
                                "a local folder of config.json + model.safetensors also works") from err
    except HfHubHTTPError as err:  # RepositoryNotFoundError, RevisionNotFoundError, gated, ...
        raise FileNotFoundError(f"cannot fetch {name!r} from the Hub: {err}") from err
