"""Finding and loading a checkpoint: its exact revision, its weights, and the Hugging Face Hub, or
not: a machine without network reads Hub ids from its local cache only, so a cached model loads at
once and a missing one fails at once with the command that fixes it, instead of after transformers'
retries."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path


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


@dataclass(frozen=True)
class ModelRef:
    """Which model a run uses, as recorded beside every row."""

    name: str
    revision: str | None


def load_hint(name: str) -> str:
    if os.path.isdir(name):
        return "check that the folder holds config.json, the weights and the processor files"
    # huggingface-hub 2.x ships only the `hf` command (`huggingface-cli` is gone).
    return (
        "if this machine cannot reach the Hugging Face Hub, download the model on one that can "
        f"(hf download {name} --local-dir DIR), copy DIR here and pass --model /path/to/that/folder"
    )


def resolve_model(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelRef:
    """Check that the model's config and processor can be loaded, and find its exact revision.

    Cheap enough for the driver (no weights), so a wrong --model stops the job before any work; a Hub
    id on a machine without network fails within seconds, once, naming the command that fixes it.
    """
    from transformers import AutoConfig, AutoProcessor
    from transformers.utils import cached_file

    hub = hub_options(name)
    try:
        AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code, **hub)
        AutoProcessor.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code, **hub)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a bad model
        if hub:
            raise offline_error(name) from None
        raise ModelLoadError(f"cannot load model {name!r}: {first_line(exc)}; {load_hint(name)}") from None
    if os.path.isdir(name):
        _check_local_weights(Path(name))
        return ModelRef(str(Path(name).resolve()), revision)
    config_path = cached_file(name, "config.json", revision=revision, **hub)
    parts = Path(config_path).parts if config_path else ()
    # Hub cache layout: .../models--org--name/snapshots/<commit sha>/config.json
    resolved = parts[-2] if len(parts) > 2 and parts[-3] == "snapshots" else revision
    return ModelRef(name, resolved)


def _check_local_weights(folder: Path) -> None:
    """Read every safetensors header, so truncated or corrupt weights stop the job in the driver.

    safetensors checks that the header describes exactly the bytes in the file; this costs one
    small read per file, not a load of the weights.
    """
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not list(folder.glob("*.bin")):
        raise ModelLoadError(f"cannot load model {str(folder)!r}: no weights (*.safetensors) in the folder")
    for path in files:
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load model {str(folder)!r}: corrupt weights in {path.name} ({first_line(exc)}); "
                "download the model again"
            ) from None


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def load_pretrained(
    auto_class: str, name: str, revision: str | None, device: str, dtype: str, trust_remote_code: bool, **model_options
):
    """(model on `device` in eval mode, processor, device) for `name` through transformers' `auto_class`
    (e.g. AutoModelForSpeechSeq2Seq); `device`/`dtype` "auto": cuda and bfloat16 when there is a GPU.
    ModelLoadError says what to do when it cannot load."""
    import torch
    import transformers

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    hub = hub_options(name)
    try:
        processor = transformers.AutoProcessor.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code, **hub
        )
        model = getattr(transformers, auto_class).from_pretrained(
            name,
            revision=revision,
            dtype=getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            **hub,
            **model_options,
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a bad model
        if hub:
            raise offline_error(name) from None
        raise ModelLoadError(f"cannot load model {name!r}: {first_line(exc)}; {load_hint(name)}") from None
    return model.to(device).eval(), processor, device
