"""Speech is found with silero VAD and cut into segments no longer than the limit, in pauses."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from conftest import SAMPLES
from granite_batch.audio import segment, vad
from granite_batch.audio.decode import load_recording, samples_to_arrow
from granite_batch.audio.segment import plan_segments, segment_table
from granite_batch.audio.vad import VadOptions, speech_probabilities, speech_regions
from granite_batch.schema import END, SEGMENT, SEGMENT_COLUMNS

RATE = 16000


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return load_recording(str(SAMPLES / "en_weather.flac")).samples


def speech_with_pauses(clip: np.ndarray, seconds_of_speech: list[float], pause_s: float = 0.6):
    """Real speech clips separated by silences; returns the samples and where the silences are."""
    parts, pauses, position = [], [], 0
    for seconds in seconds_of_speech:
        n = int(seconds * RATE)
        parts.append(np.resize(clip, n))
        position += n
        parts.append(np.zeros(int(pause_s * RATE), np.float32))
        pauses.append((position, position + int(pause_s * RATE)))
        position += int(pause_s * RATE)
    return np.concatenate(parts), pauses


def test_short_recording_with_speech_stays_whole(clip):
    samples = np.concatenate([clip, np.zeros(RATE * 6, np.float32)])
    assert plan_segments(samples, RATE, 30.0) == [(0, len(samples))]


@pytest.mark.parametrize(
    "samples",
    [
        np.zeros(RATE * 10, np.float32),
        np.zeros(RATE * 70, np.float32),
        np.random.default_rng(0).normal(0, 0.01, RATE * 40).astype(np.float32),  # hiss
        np.ones(RATE * 50, np.float32),  # a constant level is not speech
        np.zeros(100, np.float32),
        np.zeros(0, np.float32),
    ],
    ids=["silence-10s", "silence-70s", "noise-40s", "dc-50s", "100-samples", "empty"],
)
def test_recordings_without_speech_have_no_segment(samples):
    assert plan_segments(samples, RATE, 30.0) == []


def test_a_burst_too_short_to_be_a_word_has_no_segment(clip):
    assert plan_segments(clip[RATE : RATE + int(0.1 * RATE)], RATE, 30.0) == []


def test_long_recording_is_cut_in_pauses_within_the_limit_without_silence(clip):
    samples, pauses = speech_with_pauses(clip, [8, 9, 7, 12, 6, 10, 9, 11, 8], pause_s=0.6)
    samples = np.concatenate([np.zeros(RATE * 40, np.float32), samples, np.zeros(RATE * 40, np.float32)])
    bounds = plan_segments(samples, RATE, 30.0)
    assert all(0 < end - start <= 30 * RATE for start, end in bounds)
    assert all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:]))
    # The 40 s of silence on either side are left out, bar a little padding.
    assert 39.5 * RATE < bounds[0][0] < 40 * RATE and bounds[-1][1] < len(samples) - 39.5 * RATE
    # Every boundary falls where the signal is quiet: the 20 ms around it hold far less energy than
    # typical speech (the inserted pauses, or a pause inside the spoken clip itself).
    frame = int(0.02 * RATE)
    frames = np.square(samples[: len(samples) // frame * frame]).reshape(-1, frame).mean(axis=1)
    typical_speech = np.median(frames[frames > 0])
    for boundary in (b for bound in bounds for b in bound):
        around = np.square(samples[boundary - frame // 2 : boundary + frame // 2]).mean()
        assert around < 0.01 * typical_speech, f"boundary at {boundary / RATE:.2f} s is not in a quiet region"


def test_a_long_pause_ends_a_segment_a_short_one_does_not(clip):
    speech = clip[: int(3.2 * RATE)]

    def pause(seconds):
        return np.zeros(int(seconds * RATE), np.float32)

    samples = np.concatenate([speech, pause(1.0), speech, pause(6.0), speech, pause(25.0)])
    bounds = plan_segments(samples, RATE, 30.0)
    assert len(bounds) == 2
    assert bounds[0][1] < 2 * len(speech) + 1.5 * RATE < bounds[1][0]


def test_speech_without_pauses_is_still_cut_within_the_limit(clip):
    samples = np.resize(clip, RATE * 95)
    # Pauses under 5 s do not end speech here, so the speech is one 95 s region that must be cut.
    bounds = plan_segments(samples, RATE, 20.0, VadOptions(min_silence_s=5.0))
    assert len(bounds) >= 5 and all(end - start <= 20 * RATE for start, end in bounds)
    assert bounds[0][0] < 0.1 * RATE and bounds[-1][1] == len(samples)


def espeak_sentences_with_short_gaps(gap_s: tuple[float, float], repeats: int):
    """The sample recordings (espeak-ng sentences in five languages), trimmed, joined by gaps that
    alternate between `gap_s[0]` and `gap_s[1]`; the samples and every gap's (start, end, seconds)."""
    names = ["en_weather.flac", "fr_gare.mp3", "de_bibliothek.ogg", "pt_praia.wav", "es_mercado.m4a"]
    sentences = []
    for name in names:
        samples = load_recording(str(SAMPLES / name)).samples
        loud = np.flatnonzero(np.abs(samples) > 3e-3)
        sentences.append(samples[loud[0] : loud[-1] + 1])
    parts, gaps, position = [], [], 0
    for i in range(repeats):
        parts.append(sentences[i % len(sentences)])
        position += len(parts[-1])
        seconds = gap_s[i % 2]
        parts.append(np.zeros(int(seconds * RATE), np.float32))
        gaps.append((position, position + len(parts[-1]), seconds))
        position += len(parts[-1])
    return np.concatenate(parts), gaps


def test_speech_with_only_short_pauses_is_cut_in_the_longest_pause(clip):
    # Gaps of 50 and 90 ms, too short for the VAD to end speech (silero's probability barely dips in
    # them): 41 s of speech is one region to cut. Inside the sentences, quiet stretches run up to 55 ms
    # (stop closures, word boundaries), so only the 90 ms gaps are the longest pauses. Every 12 s
    # window's second half holds one of them.
    samples, gaps = espeak_sentences_with_short_gaps((0.05, 0.09), 16)
    bounds = plan_segments(samples, RATE, 12.0)
    assert len(bounds) >= 3 and bounds[0][0] == 0 and bounds[-1][1] == len(samples)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # one region, cut, not split
    long_gaps = [(start, end) for start, end, seconds in gaps if seconds == 0.09]
    for _, cut in bounds[:-1]:
        inside = [(start, end) for start, end in long_gaps if start + 0.02 * RATE <= cut <= end - 0.02 * RATE]
        assert inside, f"cut at {cut / RATE:.3f} s is not well inside a 90 ms pause"


def test_without_the_vad_a_recording_is_all_speech_cut_only_in_its_longest_pauses(monkeypatch):
    def no_vad(*args, **kwargs):
        raise AssertionError("the VAD ran")

    monkeypatch.setattr(vad, "window_probabilities", no_vad)
    options = VadOptions(vad=False)
    speech, gaps = espeak_sentences_with_short_gaps((0.05, 0.09), 16)
    lead = 20 * RATE  # silence first: kept, not dropped
    samples = np.concatenate([np.zeros(lead, np.float32), speech])
    bounds = plan_segments(samples, RATE, 12.0, options)
    # The segments tile the recording: nothing dropped, nothing twice, so no word is lost or repeated at a join.
    assert bounds[0][0] == 0 and bounds[-1][1] == len(samples) and len(bounds) >= 5
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(0 < end - start <= 12 * RATE for start, end in bounds)
    long_gaps = [(lead + start, lead + end) for start, end, seconds in gaps if seconds == 0.09]
    for _, cut in bounds[:-1]:
        in_gap = any(start + 0.02 * RATE <= cut <= end - 0.02 * RATE for start, end in long_gaps)
        assert in_gap or cut < lead, f"cut at {cut / RATE:.3f} s is neither in the silence nor in a 90 ms pause"
    # Short recordings stay whole, silent or not; too short to hold a word still means no segment.
    assert plan_segments(np.zeros(10 * RATE, np.float32), RATE, 30.0, options) == [(0, 10 * RATE)]
    assert plan_segments(np.zeros(100, np.float32), RATE, 30.0, options) == []
    table = pa.table({"id": ["a", "b"], "audio": ["a", "b"]}).append_column(
        "samples", samples_to_arrow([speech[: 5 * RATE], np.zeros(3 * RATE, np.float32)])
    )
    out = segment_table(table, RATE, 30.0, options, isolate=True)
    assert out.column("segment_count").to_pylist() == [1, 1] and out.column("row_kind").to_pylist() == [SEGMENT] * 2


def test_windowed_vad_agrees_with_silero_frame_by_frame(clip):
    from silero_vad import get_speech_timestamps

    samples, _ = speech_with_pauses(clip, [5, 3, 9, 4, 7, 2, 6, 8], pause_s=1.1)
    regions = speech_regions(speech_probabilities(samples), len(samples))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # silero's frame-by-frame loop crawls with more when cores are busy
    try:
        reference = get_speech_timestamps(
            torch.from_numpy(samples),
            vad.vad_model(),
            speech_pad_ms=0,
            min_silence_duration_ms=100,
            min_speech_duration_ms=250,
        )
    finally:
        torch.set_num_threads(threads)
    ours, theirs = np.zeros(len(samples), bool), np.zeros(len(samples), bool)
    for start, end in regions:
        ours[start:end] = True
    for region in reference:
        theirs[region["start"] : region["end"]] = True
    assert len(regions) == len(reference)
    assert (ours == theirs).mean() > 0.98


@pytest.mark.parametrize(
    "name", ["en_weather.flac", "fr_gare.mp3", "de_bibliothek.ogg", "pt_praia.wav", "es_mercado.m4a", "ja_tenki.flac"]
)
def test_speech_regions_of_the_samples_are_silero_get_speech_timestamps(name):
    from silero_vad import get_speech_timestamps

    samples = load_recording(str(SAMPLES / name)).samples
    regions = speech_regions(speech_probabilities(samples), len(samples))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = get_speech_timestamps(torch.from_numpy(samples), vad.vad_model(), speech_pad_ms=0)
    finally:
        torch.set_num_threads(threads)
    # Same rule on the probabilities, so the same regions; the windowed probabilities move an edge by
    # at most a frame or two here (README "Long recordings").
    assert len(regions) == len(reference)
    for (start, end), region in zip(regions, reference):
        assert abs(start - region["start"]) <= 2 * vad.VAD_FRAME and abs(end - region["end"]) <= 2 * vad.VAD_FRAME


def test_vad_holds_one_group_of_windows_however_long_the_recording(clip):
    options = VadOptions(batch_windows=8)
    samples = np.resize(clip, RATE * 300)  # 19 MB, 19 windows of 16 s: 3 groups
    group_bytes = options.batch_windows * (options.max_window_s + options.warmup_s) * RATE * 4  # 8.5 MB
    plan_segments(samples[: RATE * 5], RATE, 30.0, options)  # load the model first
    tracemalloc.start()
    try:
        plan_segments(samples, RATE, 30.0, options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.2 * group_bytes < 0.6 * samples.nbytes


def test_vad_model_loads_once_and_leaves_torch_threads_alone(clip):
    threads = torch.get_num_threads()
    for _ in range(3):
        segment_table(pa.table({"samples": samples_to_arrow([clip])}), RATE, 30.0)
    assert vad.vad_model.cache_info().misses == 1
    assert torch.get_num_threads() == threads


def segment_bounds(out: pa.Table) -> dict[int, list[tuple[int, int]]]:
    """Per input recording (its `rec` column), the (start, end) sample offsets of its segment rows."""
    bounds: dict[int, list[tuple[int, int]]] = {}
    for row in out.select(["rec", "row_kind", "segment_index", "segment_count", "start_s", "end_s"]).to_pylist():
        segments = bounds.setdefault(row["rec"], [])
        if row["row_kind"] == SEGMENT:
            assert row["segment_index"] == len(segments)  # in order, none missing
            segments.append((round(row["start_s"] * RATE), round(row["end_s"] * RATE)))
    return bounds


def test_segment_stage_emits_one_row_per_segment_and_one_per_recording_without(clip):
    speech, _ = speech_with_pauses(clip, [20, 25, 10])
    table = pa.table({"rec": [0, 1, 2], "samples": samples_to_arrow([speech, None, np.zeros(RATE * 5, np.float32)])})
    out = segment_table(table.slice(0, 2), RATE, 30.0)  # a slice, as Ray hands batches over
    planned = plan_segments(speech, RATE, 30.0)
    assert len(planned) >= 2
    assert out.num_rows == len(planned) + 1
    assert segment_bounds(out) == {0: planned, 1: []}
    # Each segment row carries the segment's own samples, no more than max_segment_s of them.
    for row, (start, end) in zip(out.filter(pc.equal(out.column("rec"), 0)).to_pylist(), planned):
        assert (row["row_kind"], row["segment_count"]) == (SEGMENT, len(planned))
        np.testing.assert_array_equal(np.asarray(row["samples"], np.float32), speech[start:end])
        assert len(row["samples"]) <= 30 * RATE
    no_samples = out.filter(pc.equal(out.column("rec"), 1)).to_pylist()
    assert [(r["row_kind"], r["segment_count"], r["segment_index"], r["samples"]) for r in no_samples] == [
        (END, 0, None, None)
    ]
    assert out.column_names[-len(SEGMENT_COLUMNS) - 1 :] == [*SEGMENT_COLUMNS, "samples"]
    out = segment_table(pa.concat_tables([table.slice(0, 1), table.slice(2, 1)]), RATE, 30.0)  # two chunks
    assert segment_bounds(out) == {0: planned, 2: []}  # silence: one row, no segment


def test_recordings_segmented_together_get_the_segments_they_get_alone(clip):
    long_speech, _ = speech_with_pauses(clip, [8, 12, 6, 9, 14, 7] * 4, pause_s=0.8)  # 243 s
    # Together over 256 s: more than 64 windows of 4 s, so a window length taken from the batch's total
    # (rather than each recording's own) would move every window and change the segments.
    recordings = [
        clip,
        np.concatenate([np.zeros(RATE * 3, np.float32), clip]),
        long_speech,
        np.zeros(RATE * 4, np.float32),
        clip[: int(0.1 * RATE)],
        long_speech[: RATE * 90],
    ]
    rec = list(range(len(recordings)))
    together = segment_bounds(
        segment_table(pa.table({"rec": rec, "samples": samples_to_arrow(recordings)}), RATE, 30.0)
    )
    alone = [plan_segments(samples, RATE, 30.0) for samples in recordings]
    assert together == dict(enumerate(alone))
    assert len(alone[2]) >= 2 and alone[3] == [] and alone[4] == []  # the mix holds every kind of row
    # Packed two buffers deep, as two Arrow chunks hold them.
    buffers = [np.concatenate(recordings[:3]), np.concatenate(recordings[3:])]
    spans = []
    for b, members in enumerate((recordings[:3], recordings[3:])):
        offsets = np.concatenate(([0], np.cumsum([len(r) for r in members])))
        spans += [(b, int(offsets[i]), len(r)) for i, r in enumerate(members)]
    for many, samples in zip(vad.speech_probabilities_many(buffers, spans), recordings):
        np.testing.assert_allclose(many, speech_probabilities(samples), atol=1e-4)
    # A table of several chunks (decode batches gathered into one block) segments as one batch too.
    table = pa.table({"rec": rec[:2], "samples": samples_to_arrow(recordings[:2])})
    chunked = pa.concat_tables([table, pa.table({"rec": rec[2:], "samples": samples_to_arrow(recordings[2:])})])
    assert chunked.column("samples").num_chunks == 2
    assert segment_bounds(segment_table(chunked, RATE, 30.0)) == together


def test_segment_rows_leave_in_blocks_of_bounded_size_that_make_up_the_whole(clip):
    speech, _ = speech_with_pauses(clip, [8, 12, 6, 9, 14, 7] * 3, pause_s=0.8)  # 182 s
    table = pa.table({"rec": [0, 1, 2], "samples": samples_to_arrow([clip, speech, None])})
    whole = segment_table(table, RATE, 30.0)
    block_bytes = 30 * RATE * 4  # 30 s of samples: a block ends once it holds that much
    blocks = list(segment.segment_blocks(table, RATE, 30.0, block_bytes=block_bytes))
    assert len(blocks) >= 4
    for i, block in enumerate(blocks):  # each ends with the segment that fills it, but the last
        sizes = [4 * len(samples) for samples in block.column("samples").to_pylist() if samples is not None]
        assert sum(sizes[:-1]) < block_bytes <= sum(sizes) if i < len(blocks) - 1 else sum(sizes) < block_bytes
    assert pa.concat_tables(blocks).equals(whole)
    assert segment_bounds(whole)[1] == plan_segments(speech, RATE, 30.0)


def test_the_helper_is_sent_one_group_of_windows_at_a_time_not_the_recording(clip, monkeypatch):
    from granite_batch.audio import isolation

    options = VadOptions(batch_windows=8)
    speech = np.resize(clip, RATE * 300)  # 19 MB, 3 groups of windows
    sent = []
    write = isolation._write_message

    def recording_write(fd, kind, value):
        if kind == isolation._WORK:
            _, items, _ = value
            sent.append(sum(item[0].nbytes for item in items))
        write(fd, kind, value)

    monkeypatch.setattr(isolation, "_write_message", recording_write)
    out = segment_table(pa.table({"samples": samples_to_arrow([speech])}), RATE, 30.0, options)
    frames = round(options.max_window_s * RATE / vad.VAD_FRAME) + round(options.warmup_s * RATE / vad.VAD_FRAME)
    group_bytes = options.batch_windows * frames * vad.VAD_FRAME * 4  # 8 windows of 16.5 s: 8.5 MB
    assert len(sent) == 3 and max(sent) <= group_bytes < speech.nbytes / 2
    monkeypatch.undo()
    assert out.equals(
        segment_table(pa.table({"samples": samples_to_arrow([speech])}), RATE, 30.0, options, isolate=False)
    )
