"""Cutting a pool of segments into model calls of similar lengths."""

from __future__ import annotations


def length_batches(lengths: list[int | None], max_items: int | None, max_padded: float):
    """Indices of `lengths` (None: skip that item) sorted longest first and cut into batches of at most
    `max_items` items and `max_padded` padded length (items x the batch's longest), so a batch pads to
    items of similar length. A single item longer than `max_padded` is a batch of its own."""
    order = sorted((i for i, n in enumerate(lengths) if n is not None), key=lambda i: lengths[i], reverse=True)
    batch: list[int] = []
    for index in order:
        # Sorted longest first, so the first item of a batch sets its padded length.
        full = max_items is not None and len(batch) >= max_items
        if batch and (full or lengths[batch[0]] * (len(batch) + 1) > max_padded):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch
