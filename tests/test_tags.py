"""4.1-2b-plus's tagged transcripts, written by hand as the card shows them, read into segments."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from granite_batch.models.tags import tagged_parts


def test_speaker_turns_become_segments_labelled_per_call():
    parts = tagged_parts(
        "[Speaker 1]: hello how are you [Speaker 2]: I'm fine [Speaker 1]: good",
        start_s=30.0,
        end_s=40.0,
        call=2,
        speakers=True,
        word_times=False,
    )
    assert [(p.speaker, p.text) for p in parts] == [("2:1", "hello how are you"), ("2:2", "I'm fine"), ("2:1", "good")]
    # Without word times, the call's span is shared out by characters, in order, end to end.
    assert parts[0].start == 30.0 and parts[-1].end == 40.0
    assert all(a.end == b.start for a, b in zip(parts, parts[1:]))
    assert parts[0].end - parts[0].start > parts[2].end - parts[2].start
    assert all(p.words is None for p in parts)


def test_word_end_times_unwrap_the_ten_second_clock():
    # Centiseconds modulo 1000: 990 -> 9.90 s, then 30 -> 10.30 s (transformers' granite_speech_plus docs).
    parts = tagged_parts(
        "hello [T:45] world [T:82] _ [T:120] again [T:990] wrapped [T:30] tail",
        start_s=100.0,
        end_s=115.0,
        call=0,
        speakers=False,
        word_times=True,
    )
    (part,) = parts
    assert part.words == [
        {"start": 100.0, "end": 100.45, "text": "hello"},
        {"start": 100.45, "end": 100.82, "text": "world"},
        {"start": 101.2, "end": 109.9, "text": "again"},  # starts where the silence `_` ended
        {"start": 109.9, "end": 110.3, "text": "wrapped"},
    ]
    assert part.text == "hello world again wrapped tail"  # the untimed tail stays in the text
    assert (part.start, part.end, part.speaker) == (100.0, 110.3, None)


def test_speakers_with_word_times_share_one_clock():
    parts = tagged_parts(
        "[Speaker 1]: hi [T:50] there [T:90] [Speaker 2]: yo [T:150]", 0.0, 5.0, 1, speakers=True, word_times=True
    )
    assert [(p.speaker, p.text, p.start, p.end) for p in parts] == [
        ("1:1", "hi there", 0.0, 0.9),
        ("1:2", "yo", 0.9, 1.5),
    ]
    assert parts[1].words == [{"start": 0.9, "end": 1.5, "text": "yo"}]


@pytest.mark.parametrize(
    "text",
    [
        "[Speaker x]: [T:abc] broken [T:",
        "[T:5000] far past the end",
        "[T:99999999999999999999] x [T:-3]",
        "[Speaker 1]:",
        "[Speaker 1]: [Speaker 2]:",
        "",
        "_ _ [T:10]",
        "]][[ [T:][Speaker]: words",
    ],
)
def test_malformed_tags_never_fail_and_stay_inside_the_call(text):
    for speakers in (True, False):
        for word_times in (True, False):
            parts = tagged_parts(text, 10.0, 20.0, 0, speakers, word_times)
            assert parts
            for part in parts:
                assert 10.0 <= part.start <= part.end <= 20.0
                for word in part.words or []:
                    assert 10.0 <= word["start"] <= word["end"] <= 20.0


def test_tags_not_asked_for_are_dropped_from_the_text():
    (part,) = tagged_parts("[Speaker 1]: hello [T:45] there", 0.0, 2.0, 0, speakers=False, word_times=False)
    assert part.text == "hello there"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab _[]:T0123456789Speker")), max_size=80), st.booleans(), st.booleans())
def test_any_text_gives_ordered_parts_inside_the_call(text, speakers, word_times):
    parts = tagged_parts(text, 5.0, 9.0, 3, speakers, word_times)
    assert parts
    previous = 5.0
    for part in parts:
        assert previous <= part.start <= part.end <= 9.0
        previous = part.end if word_times else part.start
        for word in part.words or []:
            assert 5.0 <= word["start"] <= word["end"] <= 9.0
