"""TurboCTC's input features for a batch of segments, each exactly as its own processor call makes them.

`GraniteSpeech5FeatureExtractor` zero-pads a batch's waveforms before its STFT, so the last frames of
every shorter clip differ from that clip's own call (its centred STFT reflects the clip's tail, its
log-mel floor is the row's maximum over the padded frames too, its deltas read the next, padded,
frame). Calling the extractor once per segment keeps each segment's features exact, but on an H200
those calls took half of the job's GPU time (`benchmarks/bench_gpu_ctc.py`: features alone 12,457x
against the whole decode's 6,910x, 1,024 clips of 2-30 s).

`batch_features` makes the same numbers in one pass: each row is the clip as its own call pads it
(zeros up to whole frame-stacking groups, then the STFT's reflection of its own tail), the STFT runs
uncentred over those rows, and the row maximum and the deltas' edge see only the row's own frames.
The arithmetic is the extractor's (transformers 5.24, `feature_extraction_granite_speech5.py`), with
its own mel filter bank and window; tests compare it with one call per clip on many lengths.
"""

from __future__ import annotations

import copy

import numpy as np


def batch_features(feature_extractor, clips: list[np.ndarray], device: str, dtype):
    """(features [batch, frames, dims] in `dtype`, attention mask [batch, frames]) for 16 kHz mono
    `clips`, every row equal to `feature_extractor(clip)["input_features"][0]` followed by zeros."""
    import torch
    import torchaudio

    hop = feature_extractor.hop_length
    stacking = feature_extractor.frame_stacking
    spectrogram = feature_extractor.mel_filters.spectrogram
    half = spectrogram.n_fft // 2 if spectrogram.center else 0
    # Each clip's own frame count: whole stacking groups of mel frames (as _extract_features rounds up).
    frames = [stacking * -(-(len(clip) // hop) // stacking) for clip in clips]
    rows = []
    for clip, count in zip(clips, frames):
        needed = (count - 1) * hop + 1  # samples its own call pads the waveform to, with zeros
        own = np.pad(clip.astype(np.float32, copy=False), (0, max(0, needed - len(clip))))
        rows.append(np.pad(own, (half, half), mode=spectrogram.pad_mode) if half else own)
    width = max(len(row) for row in rows)
    buffer = np.zeros((len(rows), width), dtype=np.float32)
    for index, row in enumerate(rows):
        buffer[index, : len(row)] = row
    mel_filters = _uncentred(feature_extractor).to(device)
    most = max(frames)
    lengths = torch.tensor(frames, device=device)
    with torch.no_grad():
        mel = mel_filters(torch.from_numpy(buffer).to(device))[..., :most]
        logmel = mel.clamp_min_(1e-10).log10_()
        valid = torch.arange(most, device=device)[None, :] < lengths[:, None]  # [batch, frames]
        row_max = logmel.masked_fill(~valid[:, None, :], -torch.inf).amax(dim=(-2, -1), keepdim=True)
        logmel = torch.maximum(logmel, row_max - feature_extractor.logmel_floor_db).div_(4).add_(1)
        # The deltas' edge is each row's own last frame (compute_deltas pads by replication).
        last = torch.minimum(torch.arange(most, device=device)[None, :], lengths[:, None] - 1)
        logmel = torch.gather(logmel, 2, last[:, None, :].expand_as(logmel))
        deltas = torchaudio.functional.compute_deltas(logmel, win_length=feature_extractor.delta_win_length)
        features = torch.cat((logmel, deltas), dim=-2).transpose(-1, -2)
        features = features.reshape(len(clips), most // stacking, stacking * features.shape[-1])
        mask = valid[:, ::stacking]
        features = features.masked_fill(~mask[..., None], 0.0).to(dtype)
    return features, mask.long()


def _uncentred(feature_extractor):
    """The extractor's own MelSpectrogram (filters, window, FFT size), with the centring padding done by
    `batch_features` per row instead of once for the padded batch. Made once per extractor."""
    cached = getattr(feature_extractor, "_granite_batch_uncentred", None)
    if cached is None:
        cached = copy.deepcopy(feature_extractor.mel_filters)
        cached.spectrogram.center = False
        feature_extractor._granite_batch_uncentred = cached
    return cached
