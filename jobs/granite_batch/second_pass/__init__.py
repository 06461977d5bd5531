"""A language model over committed transcripts."""
