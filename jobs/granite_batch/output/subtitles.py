"""Subtitles from transcript segments: SubRip (.srt) and WebVTT (.vtt), one file per recording.

Files go to `OUTPUT/subtitles/<format>/<id>.<format>` on any URI the job can write. The id is
percent-encoded where it holds anything but letters, digits and `-_.~` (a `/` becomes `%2F`), so
no id can reach outside that folder; a name that would pass 255 bytes is shortened to a prefix of
it and a digest of the whole id (`subtitle_name`). Each file appears whole: locally it is written under
`_staging/` and renamed; an object store's single PUT is already atomic.

Cues follow common broadcast practice (the BBC's subtitle guidelines, Netflix's timed-text style
guide): at most 2 lines of at most 42 characters, about 1 to 7 seconds on screen, a new cue at a
pause in speech or after a sentence, a long cue also after a clause. They are cut at word times
when the segments have words (`word_timestamps`); otherwise the segment's words share its span in
proportion to their lengths (alignment.proportional_words), so a 30 s segment still becomes
readable cues, with times only as good as that estimate.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
from urllib.parse import quote

import pyarrow as pa

from granite_batch.models.alignment import UNSPACED_SCRIPT, proportional_words, split_words
from granite_batch.schema import STAGING_DIR
from granite_batch.storage import OutputRoot

FORMATS = ("srt", "vtt")
# One path component: at most 255 bytes on ext4, XFS, btrfs, APFS and NTFS (255 UTF-16 units); S3
# and GCS keys may be 1024 bytes in all, which leaves the output root about 750 of them.
MAX_NAME_BYTES = 255
DIGEST_MARK = "%-"
DIGEST_CHARS = 32  # 128 bits of SHA-256
SUBTITLES_DIR = "subtitles"
MAX_LINE_CHARS = 42
MAX_LINES = 2
MIN_CUE_S = 1.0
MAX_CUE_S = 7.0
PAUSE_S = 0.5  # silence between two words that starts a new cue
_SENTENCE_END = re.compile(r"[.!?。！？…][\"'”’)\]]*$")
_CLAUSE_END = re.compile(r"[,;:、，；：—–-][\"'”’)\]]*$")


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _join(words: list[str]) -> str:
    """Words as one text: no space between two words of Japanese or Chinese."""
    text = ""
    for word in words:
        if text and not (UNSPACED_SCRIPT.search(text[-1]) and UNSPACED_SCRIPT.search(word[0])):
            text += " "
        text += word
    return text


def wrap_lines(words: list[str], width: int = MAX_LINE_CHARS) -> list[str]:
    """`words` on one line if they fit `width`, else on two lines broken at the word boundary that
    makes the longer line shortest (a bottom-heavy tie-break, as broadcasters prefer)."""
    whole = _join(words)
    if len(whole) <= width or len(words) < 2:
        return [whole]
    best = min(
        range(1, len(words)),
        key=lambda k: (
            max(len(_join(words[:k])), len(_join(words[k:]))),
            len(_join(words[:k])) > len(_join(words[k:])),
        ),
    )
    return [_join(words[:best]), _join(words[best:])]


def _fits(words: list[str]) -> bool:
    lines = wrap_lines(words)
    return len(lines) <= MAX_LINES and all(len(line) <= MAX_LINE_CHARS for line in lines)


def _segment_words(segment: dict) -> list[dict]:
    """The segment's words with times: its own, or its text spread over its span."""
    if segment.get("words"):
        return [w for w in segment["words"] if (w.get("text") or "").strip()]
    end = max(segment["end"], segment["start"] + 0.001)
    return [w.as_dict() for w in proportional_words(split_words(segment["text"] or ""), segment["start"], end)]


def _cues(segments: list[dict]) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue: words gathered while they fit 2 lines of 42 characters and
    7 seconds, cut earlier at a pause, after a sentence, or after a clause once the cue is half full;
    each cue shown at least 1 s where the next cue leaves room. Lines are separated by a newline and
    are never blank (a blank line would end a cue)."""
    groups: list[list[dict]] = []
    for segment in segments:
        current: list[dict] = []
        for word in _segment_words(segment):
            word = {**word, "text": re.sub(r"\s+", " ", word["text"]).strip()}
            if current:
                texts = [w["text"] for w in current]
                last = current[-1]
                span_s = current[-1]["end"] - current[0]["start"]
                if (
                    not _fits(texts + [word["text"]])
                    or word["end"] - current[0]["start"] > MAX_CUE_S
                    or word["start"] - last["end"] >= PAUSE_S
                    or (_SENTENCE_END.search(last["text"]) and span_s >= MIN_CUE_S)
                    or (_CLAUSE_END.search(last["text"]) and len(_join(texts)) >= MAX_LINE_CHARS * MAX_LINES // 2)
                ):
                    groups.append(current)
                    current = []
            current.append(word)
        if current:
            groups.append(current)
    cues = []
    for index, group in enumerate(groups):
        start = group[0]["start"]
        following = groups[index + 1][0]["start"] if index + 1 < len(groups) else math.inf
        end = min(max(group[-1]["end"], start + MIN_CUE_S), start + MAX_CUE_S, following)
        cues.append((start, max(end, start + 0.001), "\n".join(wrap_lines([w["text"] for w in group]))))
    return cues


def to_srt(segments: list[dict]) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, one or two lines, a blank line.

    Segments without text make no cue; `segments` are dicts with `start`, `end` (seconds), `text`
    and optionally `words` (dicts with `start`, `end`, `text`); see `_cues` for how cues are cut.
    """
    blocks = [
        f"{number}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text}\n"
        for number, (start, end, text) in enumerate(_cues(segments), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: list[dict]) -> str:
    """WebVTT: the `WEBVTT` header, then cues `HH:MM:SS.mmm --> HH:MM:SS.mmm` with escaped text."""
    blocks = ["WEBVTT\n"]
    for start, end, text in _cues(segments):
        # `&`, `<` and `>` are markup in cue text; escaping `>` also keeps `-->` out of it.
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        blocks.append(f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{text}\n")
    return "\n".join(blocks)


RENDER = {"srt": to_srt, "vtt": to_vtt}


def subtitle_name(row_id: str, subtitle_format: str) -> str:
    """The file name of `row_id`'s subtitles: the id percent-encoded, or, when that would pass
    `MAX_NAME_BYTES` with its extension, a readable prefix of it, `%-` and a digest of the whole id.
    Distinct ids get distinct names: an encoded id never holds `%-` (its `%` is always followed by
    two hex digits), so a shortened name is never some other id's full one."""
    name = quote(row_id, safe="-_.~")
    if name in (".", ".."):
        name = name.replace(".", "%2E")
    extension = f".{subtitle_format}"
    if len(name) + len(extension) > MAX_NAME_BYTES:  # ASCII after quote(): characters are bytes
        digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_CHARS]
        prefix = name[: MAX_NAME_BYTES - len(extension) - len(DIGEST_MARK) - DIGEST_CHARS]
        escape = prefix.rfind("%", len(prefix) - 2)
        if escape != -1:
            prefix = prefix[:escape]  # never half of a %XX
        name = f"{prefix}{DIGEST_MARK}{digest}"
    return name + extension


def subtitle_path(root: str, subtitle_format: str, row_id: str) -> str:
    """Where the `subtitle_format` file of `row_id` lives under the output root `root`."""
    return posixpath.join(root, SUBTITLES_DIR, subtitle_format, subtitle_name(row_id, subtitle_format))


def write_subtitles(table: pa.Table, output: OutputRoot, formats: list[str], run_id: str) -> list[str]:
    """Write one file per format for each row of `table` that succeeded and has segments;
    return the paths written. Rows with an error or without segments are skipped."""
    if not formats or table.num_rows == 0:
        return []
    fs, root = output.fs_and_path
    local = output.local
    written = []
    rows = table.select(["id", "error", "segments"]).to_pylist()
    for subtitle_format in formats:
        folder = posixpath.join(root, SUBTITLES_DIR, subtitle_format)
        fs.makedirs(folder, exist_ok=True)
        staging = posixpath.join(root, STAGING_DIR, run_id, SUBTITLES_DIR, subtitle_format)
        if local:
            fs.makedirs(staging, exist_ok=True)
        for row in rows:
            if row["error"] is not None or not row["segments"]:
                continue
            data = RENDER[subtitle_format](row["segments"]).encode("utf-8")
            final = subtitle_path(root, subtitle_format, row["id"])
            if local:
                staged = posixpath.join(staging, posixpath.basename(final))
                fs.pipe_file(staged, data)
                fs.mv(staged, final)
            else:
                fs.pipe_file(final, data)
            written.append(final)
    return written
