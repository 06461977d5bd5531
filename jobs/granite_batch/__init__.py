"""granite-batch: transcribe and translate audio archives with IBM Granite Speech on Ray Data."""

__version__ = "0.1.0"
