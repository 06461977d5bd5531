"""Reaching the Hugging Face Hub, or not: a machine without network reads Hub ids from its local
cache only, so a cached model loads at once and a missing one fails at once with the command that
fixes it, instead of after transformers' retries."""

from __future__ import annotations

import functools
import os


class ModelLoadError(RuntimeError):
    """The model (or its config, processor or weights) cannot be loaded: the job stops before any work."""


# How long the driver waits to learn whether the Hub answers at all, before any transformers call
# (whose own retries take minutes on a machine without network).
HUB_PROBE_S = 3.0
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether Hub ids must be read from the local cache only: HF_HUB_OFFLINE is set, or the Hub's
    endpoint does not accept a connection within HUB_PROBE_S seconds (asked once per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    return not _hub_reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@functools.lru_cache(maxsize=8)
def _hub_reachable(endpoint: str, timeout_s: float = HUB_PROBE_S) -> bool:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def offline_error(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load model {name!r}: the Hugging Face Hub cannot be reached (or HF_HUB_OFFLINE is set) "
        f"and the model is not in this machine's Hub cache; on a machine with network run "
        f"`hf download {name} --local-dir DIR`, copy DIR here and pass --model DIR"
    )


def hub_options(name: str) -> dict:
    """`local_files_only=True` for a Hub id when the Hub cannot be reached, so a cached model loads at
    once and a missing one fails at once, instead of after transformers' retries."""
    return {"local_files_only": True} if not os.path.isdir(name) and hub_offline() else {}
