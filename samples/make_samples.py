"""Regenerate the sample recordings with espeak-ng (Debian package `espeak-ng`) and PyAV.

    python samples/make_samples.py

Each sample is a real speech recording of one sentence, stored in a different container/codec so
the samples exercise the decoder too. The manifest's `reference` holds the spoken text.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import av
import numpy as np
import soundfile as sf

HERE = Path(__file__).parent

# (file name, espeak voice, language, text, codec, container format)
SAMPLES = [
    ("en_weather.flac", "en-us", "en", "The weather today is sunny with a light breeze from the west.", "flac", "flac"),
    ("fr_gare.mp3", "fr-fr", "fr", "Le train pour Lyon part de la gare à huit heures.", "mp3", "mp3"),
    ("de_bibliothek.ogg", "de", "de", "Die Bibliothek ist am Sonntag geschlossen.", "libopus", "ogg"),
    ("es_mercado.m4a", "es", "es", "El mercado abre todos los días a las nueve.", "aac", "mp4"),
    ("pt_praia.wav", "pt-br", "pt", "Nós vamos à praia no fim de semana.", "pcm_s16le", "wav"),
    ("ja_tenki.flac", "ja", "ja", "今日はとても良い天気です。", "flac", "flac"),
]


def speak(voice: str, text: str) -> tuple[np.ndarray, int]:
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", tmp.name, text], check=True)
        samples, rate = sf.read(tmp.name, dtype="int16")
    return samples, rate


def encode(samples: np.ndarray, rate: int, path: Path, codec: str, container: str) -> None:
    out_rate = 48000 if codec == "libopus" else (16000 if codec == "pcm_s16le" else rate)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=out_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=out_rate)
        frames = resampler.resample(frame) + resampler.resample(None)
        for f in frames:
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def main() -> None:
    rows = []
    for name, voice, language, text, codec, container in SAMPLES:
        samples, rate = speak(voice, text)
        encode(samples, rate, HERE / name, codec, container)
        rows.append({"audio": name, "language": language, "reference": text, "speaker": "espeak-ng " + voice})
    rows.append(
        {
            "audio": "fr_gare.mp3",
            "language": "fr",
            "task": "ast",
            "target_language": "en",
            "reference": "The train to Lyon leaves the station at eight o'clock.",
            "speaker": "espeak-ng fr-fr",
        }
    )
    rows.append(
        {
            "audio": "en_weather.flac",
            "language": "en",
            "keywords": ["breeze", "sunny"],
            "reference": SAMPLES[0][3],
            "speaker": "espeak-ng en-us",
        }
    )
    with open(HERE / "manifest.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
