"""Manifest rows in, rows still to do out: reading, listing, shards and planning."""
