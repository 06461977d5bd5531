"""Subtitles from segments: valid SRT and WebVTT, read back with real parsers, on disk and on S3."""

from __future__ import annotations

import html
import re
from datetime import timedelta

import pyarrow as pa
import srt
import webvtt

from granite_batch.output.subtitles import (
    MAX_CUE_S,
    MAX_LINE_CHARS,
    MIN_CUE_S,
    subtitle_name,
    subtitle_path,
    to_srt,
    to_vtt,
    write_subtitles,
)
from granite_batch.schema import SEGMENT_TYPE
from granite_batch.storage import OutputRoot

SEGMENTS = [
    {"start": 0.0, "end": 1.5, "text": "The weather today is mild."},
    {"start": 2.25, "end": 2.25, "text": "   "},  # no words: no cue
    {"start": 4.0004, "end": 5.9996, "text": "Fish & chips\n\nare <cheap> --> here"},
    {"start": 3725.5, "end": 3727.125, "text": "An hour later."},
]
CUES = [
    (0.0, 1.5, "The weather today is mild."),
    (4.0, 6.0, "Fish & chips are <cheap> --> here"),
    (3725.5, 3727.125, "An hour later."),
]
SRT_TIME = r"\d{2,}:\d{2}:\d{2},\d{3}"
VTT_TIME = r"\d{2,}:\d{2}:\d{2}\.\d{3}"


def seconds(value: str) -> float:
    hours, minutes, rest = value.replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest)


def test_srt_is_numbered_cues_with_comma_milliseconds():
    text = to_srt(SEGMENTS)
    parsed = list(srt.parse(text))
    assert [s.index for s in parsed] == [1, 2, 3]
    assert [(s.start, s.end, s.content) for s in parsed] == [
        (timedelta(seconds=a), timedelta(seconds=b), words) for a, b, words in CUES
    ]
    timing_lines = [line for line in text.splitlines() if "-->" in line and line[0].isdigit()]
    assert len(timing_lines) == 3
    assert all(re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", line) for line in timing_lines)
    assert "01:02:05,500 --> 01:02:07,125" in timing_lines


def test_vtt_has_header_dot_milliseconds_and_escaped_text():
    text = to_vtt(SEGMENTS)
    assert text.startswith("WEBVTT\n\n")
    captions = list(webvtt.from_string(text, strict=True))
    assert [(seconds(c.start), seconds(c.end), html.unescape(c.text)) for c in captions] == CUES
    assert all(re.fullmatch(VTT_TIME, value) for c in captions for value in (c.start, c.end))
    # Markup characters are escaped, and no cue text can hold the timing arrow.
    assert "Fish &amp; chips are &lt;cheap&gt; --&gt; here" in text
    assert sum("-->" in line for line in text.splitlines()) == 3


def test_no_segments_make_valid_empty_files():
    assert list(srt.parse(to_srt([]))) == []
    assert list(webvtt.from_string(to_vtt([]), strict=True)) == []


def test_ids_cannot_leave_the_subtitles_folder():
    assert subtitle_path("out", "srt", "rec-1") == "out/subtitles/srt/rec-1.srt"
    assert subtitle_path("out", "vtt", "../../etc/passwd") == "out/subtitles/vtt/..%2F..%2Fetc%2Fpasswd.vtt"
    assert subtitle_path("out", "srt", "..") == "out/subtitles/srt/%2E%2E.srt"


def transcript_rows() -> pa.Table:
    return pa.table(
        {
            "id": ["ok", "failed", "silent", "a/b"],
            "error": [None, "decode failed: empty file (0 bytes)", None, None],
            "segments": pa.array([SEGMENTS, [], [], SEGMENTS[:1]], pa.list_(SEGMENT_TYPE)),
        }
    )


def test_write_one_file_per_format_for_rows_with_segments_only(tmp_path):
    written = write_subtitles(transcript_rows(), OutputRoot(str(tmp_path)), ["srt", "vtt"], "run-1")
    assert len(written) == 4
    files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "subtitles").rglob("*") if p.is_file())
    assert files == [
        "subtitles/srt/a%2Fb.srt",
        "subtitles/srt/ok.srt",
        "subtitles/vtt/a%2Fb.vtt",
        "subtitles/vtt/ok.vtt",
    ]
    assert len(list(srt.parse((tmp_path / "subtitles/srt/ok.srt").read_text(encoding="utf-8")))) == 3
    assert len(webvtt.read(str(tmp_path / "subtitles/vtt/a%2Fb.vtt")).captions) == 1
    assert not any((tmp_path / "_staging" / "run-1").rglob("*.srt"))  # staged files were moved, not copied


def test_write_to_s3(s3, s3_server):
    s3.mkdir("subs")
    options = {"s3": {"endpoint_url": s3_server}}
    write_subtitles(transcript_rows(), OutputRoot("s3://subs/out", options), ["vtt"], "run-1")
    assert sorted(s3.ls("subs/out/subtitles/vtt")) == [
        "subs/out/subtitles/vtt/a%2Fb.vtt",
        "subs/out/subtitles/vtt/ok.vtt",
    ]
    captions = webvtt.from_string(s3.cat("subs/out/subtitles/vtt/ok.vtt").decode("utf-8"), strict=True)
    assert len(captions) == 3


def test_long_ids_get_names_that_fit_every_filesystem_and_stay_distinct(tmp_path):
    long = "a" * 5000
    ids = [long, long[:-1] + "b", "日本語" * 400, "%" * 300, "x" * 251, "x" * 252]
    names = [subtitle_name(row_id, "srt") for row_id in ids]
    assert all(len(name.encode("utf-8")) <= 255 for name in names)
    assert len(set(names)) == len(ids)
    assert names[4] == "x" * 251 + ".srt"  # short enough: the id itself, as before
    assert names[0].startswith("a" * 100) and "%-" in names[0]  # readable, then the digest
    # An id spelled like another id's shortened name is still its own file.
    lookalike = names[0][: -len(".srt")]
    assert subtitle_name(lookalike, "srt") != names[0]
    table = pa.table(
        {"id": ids, "error": [None] * len(ids), "segments": pa.array([SEGMENTS[:1]] * len(ids), pa.list_(SEGMENT_TYPE))}
    )
    written = write_subtitles(table, OutputRoot(str(tmp_path)), ["srt", "vtt"], "run-1")
    assert len(written) == 2 * len(ids)
    assert len(list((tmp_path / "subtitles" / "vtt").iterdir())) == len(ids)


LONG_TEXT = (
    "The weather today is mild, with a light breeze from the west. Tomorrow brings rain in the "
    "morning and sunshine after lunch, so take an umbrella when you leave the house early. Fishermen "
    "along the coast expect calm water until Thursday, when a storm from the Atlantic arrives."
)


def parsed_cues(segments: list[dict]) -> tuple[list, list]:
    """The cues of both formats as (start s, end s, lines), read back by the `srt` and `webvtt` parsers."""
    from_srt = [
        (s.start.total_seconds(), s.end.total_seconds(), s.content.split("\n")) for s in srt.parse(to_srt(segments))
    ]
    from_vtt = [
        (seconds(c.start), seconds(c.end), html.unescape(c.text).split("\n"))
        for c in webvtt.from_string(to_vtt(segments), strict=True)
    ]
    return from_srt, from_vtt


def assert_readable(cues: list, text: str, span: tuple[float, float]) -> None:
    assert cues
    for start, end, lines in cues:
        assert 1 <= len(lines) <= 2 and all(0 < len(line) <= MAX_LINE_CHARS for line in lines), lines
        assert MIN_CUE_S - 1e-3 <= end - start <= MAX_CUE_S + 1e-3, (start, end, lines)
        assert span[0] - 1e-3 <= start < end <= span[1] + MIN_CUE_S
    assert all(a[1] <= b[0] + 1e-3 for a, b in zip(cues, cues[1:]))  # in order, never overlapping
    assert " ".join(" ".join(lines) for _, _, lines in cues).split() == text.split()


def test_a_long_segment_without_words_is_split_in_proportion_into_readable_cues():
    segments = [{"start": 12.0, "end": 42.0, "text": LONG_TEXT}]
    from_srt, from_vtt = parsed_cues(segments)
    assert from_srt == from_vtt
    assert_readable(from_srt, LONG_TEXT, (12.0, 42.0))
    assert len(from_srt) >= 5 and from_srt[0][0] == 12.0 and from_srt[-1][1] == 42.0
    # Sentences end cues: every sentence's last word closes a cue.
    ends = [lines[-1].split()[-1] for _, _, lines in from_srt]
    assert {"west.", "early.", "arrives."} <= set(ends)


def timed_words(text: str, start: float, word_s: float = 0.3, pauses: dict[int, float] | None = None) -> list[dict]:
    words, at = [], start
    for index, word in enumerate(text.split()):
        at += (pauses or {}).get(index, 0.05)
        words.append({"start": round(at, 3), "end": round(at + word_s, 3), "text": word, "confidence": 0.9})
        at += word_s
    return words


def test_cues_follow_word_times_and_break_at_pauses():
    # Pauses of 1.2 s before word 8 and 0.8 s before word 30, mid-sentence: a cue starts at each.
    words = timed_words(LONG_TEXT, 3.0, pauses={8: 1.2, 30: 0.8})
    segments = [{"start": 3.0, "end": words[-1]["end"] + 0.2, "text": LONG_TEXT, "words": words}]
    from_srt, from_vtt = parsed_cues(segments)
    assert from_srt == from_vtt
    assert_readable(from_srt, LONG_TEXT, (3.0, segments[0]["end"]))
    starts = {round(start, 3) for start, _, _ in from_srt}
    assert words[8]["start"] in starts and words[30]["start"] in starts
    # A cue starts at its first word and ends at its last (or later, up to 1 s, when it is short).
    by_start = {w["start"]: w for w in words}
    assert all(round(start, 3) in by_start for start in starts)
    ends = {w["end"] for w in words}
    assert sum(round(end, 3) in ends for _, end, _ in from_srt) >= len(from_srt) - 1


def test_short_and_unspaced_cues():
    # One short word is shown for a second; Japanese words join without spaces.
    from_srt, _ = parsed_cues([{"start": 1.0, "end": 1.2, "text": "Yes."}])
    assert from_srt == [(1.0, 2.0, ["Yes."])]
    words = [{"start": 0.0, "end": 0.8, "text": "今日は、"}, {"start": 0.8, "end": 1.6, "text": "いい天気です。"}]
    from_srt, _ = parsed_cues([{"start": 0.0, "end": 1.6, "text": "今日は、いい天気です。", "words": words}])
    assert from_srt == [(0.0, 1.6, ["今日は、いい天気です。"])]
