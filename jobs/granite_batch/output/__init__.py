"""The transcript dataset: writing, what is committed, the run summary, subtitles."""
