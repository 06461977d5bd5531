"""Load any Granite Speech checkpoint with the engine its profile names (profiles.py).

`load_speech_model` is what the model actor calls: an LLM-based checkpoint (`granite_speech`,
`granite_speech_plus`) becomes a model.SpeechModel, a CTC one (`granite_speech5_ctc`) a
ctc.CtcSpeechModel; both answer `generate_segments(items) -> [SegmentResult]`.
"""

from __future__ import annotations

from granite_batch.models.bpe_draft import load_bpe_head
from granite_batch.models.ctc import CtcSpeechModel
from granite_batch.models.hub import ModelLoadError, first_line, load_hint
from granite_batch.models.model import SpeechModel
from granite_batch.models.profiles import CTC, ModelProfile, UnsupportedModel, detect_profile


def model_profile(
    name: str, revision: str | None = None, trust_remote_code: bool = False, override: str | None = None
) -> ModelProfile:
    """The checkpoint's profile, or ModelLoadError when its config cannot be read or is not Granite Speech."""
    try:
        return detect_profile(name, revision, trust_remote_code, override)
    except UnsupportedModel as exc:
        raise ModelLoadError(f"cannot run model {name!r}: {exc}") from None
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {first_line(exc)}; {load_hint(name)}") from None


def load_speech_model(
    name: str,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    profile: ModelProfile | None = None,
    **options,
):
    """Load `name` (hub id or folder) with the engine of its profile (detected when not given)."""
    profile = profile or model_profile(name, revision, trust_remote_code)
    engine = CtcSpeechModel if profile.engine == CTC else SpeechModel
    speech_model = engine.load(
        name, revision, device=device, dtype=dtype, trust_remote_code=trust_remote_code, profile=profile, **options
    )
    speculative = options.get("speculative")
    if profile.bpe_drafting and speculative is not None and speculative.mode != "autoregressive":
        speech_model.bpe_head = load_bpe_head(name, revision, speech_model.model, speech_model.device)
    return speech_model
