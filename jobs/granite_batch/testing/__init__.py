"""Tiny random checkpoints of the real architectures, for tests and the CLI's tiny-model command."""
