"""Recordings to segments: decoding, speech detection, cutting, and the helper process that
isolates native crashes."""
