"""A model argument -> a local Hugging Face folder: ``resolve_model_path``.

Everywhere the library takes a model path it also takes a Hugging Face Hub id (``org/name`` or ``name``):
an existing local folder always wins; otherwise the id is fetched through ``huggingface_hub.snapshot_download``
into the usual Hugging Face cache (only config, safetensors weights, tokenizer and generation files), and the
snapshot folder in the cache is returned. ``HF_HUB_OFFLINE=1`` reads the cache only; ``HF_HOME`` /
``HF_HUB_CACHE`` pick the cache and ``HF_TOKEN`` authenticates, as for huggingface_hub itself (the cache
folder and the offline switch are read from the environment at call time, so a change made after import
counts too).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from proxytune_jax.errors import UserError

# What the library reads from a model repo (no PyTorch .bin, no original/ or consolidated.* copies).
HUB_FILES = [
    "config.json", "generation_config.json",
    "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
]
# huggingface_hub's REPO_ID_REGEX, with at most one "/".
_HUB_ID = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b")
_TRUE = {"1", "on", "yes", "true"}


def _looks_like_path(name: str) -> bool:
    """Clearly a filesystem path (never tried on the Hub): absolute, ./ ../ ~, several '/', a backslash, or
    anything else huggingface_hub would refuse as a repo id (other characters, '--', '..')."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or "--" in name
            or ".." in name or not _HUB_ID.fullmatch(name))


def _env_path(value: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(value)))


def _cache_dir() -> Path:
    """The Hub cache huggingface_hub would use if the process started now: ``HF_HUB_CACHE`` (or the legacy
    ``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, else huggingface_hub's own default."""
    from huggingface_hub import constants
    value = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if value:
        return _env_path(value)
    if os.environ.get("HF_HOME"):
        return _env_path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE) or (env or "").strip().lower() in _TRUE


def resolve_model_path(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       what: str = "model") -> Path:
    """A local folder holding the model ``name_or_path`` (a folder, or a Hub id resolved through the HF cache).

    An existing folder is returned as is (``revision`` is then ignored). A clearly local path (``/...``,
    ``./...``, ``~...``, ``a/b/c``) that does not exist raises UserError. Anything else is a Hub id: its config,
    safetensors weights and tokenizer files are downloaded (at ``revision``: a branch, tag or commit; default
    ``main``) into the Hugging Face cache, or found there when offline. ``what`` names the argument in error
    messages (e.g. ``"--target"`` or ``"teacher"``).
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{what} {name} is a file, not a folder; pass a Hugging Face model folder "
                        "(config.json + *.safetensors) or a Hub id like org/name")
    if not name or _looks_like_path(name):
        raise UserError(f"{what} {name}: no such folder (the folder does not exist); pass a Hugging Face "
                        "model folder or a Hub id like org/name")
    return _from_hub(name, revision, what)


def _from_hub(repo_id: str, revision: str | None, what: str) -> Path:
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 2.4
    cache, offline = _cache_dir(), _offline()
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                      allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as e:  # offline, or the Hub unreachable, and not in the cache
        where = "is only partly in" if isinstance(e, incomplete) else "is not in"
        reason = str(e).splitlines()[0].removeprefix("Got: ")[:200] if str(e) else type(e).__name__
        state = ("HF_HUB_OFFLINE=1: offline, reading the cache only" if offline
                 else f"HF_HUB_OFFLINE is not set, but the Hub could not be reached: {reason}")
        rev = f" --revision {revision}" if revision else ""
        raise UserError(
            f"{what} {repo_id}: no such local folder, and the Hub model {repo_id}{at} {where} the Hugging Face "
            f"cache {cache} ({state}). Download it once, online, with `hf download {repo_id}{rev}` (the "
            "`huggingface-cli download` of older huggingface_hub; HF_HUB_CACHE or HF_HOME pick the cache), "
            "or pass a local model folder"
        ) from None
    except GatedRepoError:
        raise UserError(f"{what} {repo_id}: the Hub model is gated; accept its terms on huggingface.co and set "
                        "HF_TOKEN (or run `huggingface-cli login`), or pass a local model folder") from None
    except RepositoryNotFoundError:
        raise UserError(f"{what} {repo_id}: no such local folder, and no model {repo_id} on the Hugging Face Hub "
                        "(or it is private: set HF_TOKEN); check the name or pass a local model folder") from None
    except RevisionNotFoundError:
        raise UserError(f"{what} {repo_id}: the Hub model has no revision {revision!r}; give an existing "
                        "branch, tag or commit hash") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"{what} {repo_id}: could not fetch it from the Hugging Face Hub into {cache} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); "
                        "retry, or pass a local model folder") from None
