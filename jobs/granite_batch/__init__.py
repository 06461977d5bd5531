"""granite-batch: transcribe and translate audio archives with IBM Granite Speech on Ray Data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from granite_batch.run.processor import Processor, build_processor

__all__ = ["Processor", "build_processor"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use: `granite_batch.models` runs on a bare GPU machine without pyarrow or Ray.
    if name in __all__:
        from granite_batch.run import processor

        return getattr(processor, name)
    raise AttributeError(f"module 'granite_batch' has no attribute {name!r}")
