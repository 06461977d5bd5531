"""A vLLM general plugin that makes Granite Speech's audio encoding independent of its batch.

Stock vLLM (0.32, `model_executor/models/granite_speech.py`) zero-pads the mel features of every audio
encoded in one engine step to the longest of them and runs the conformer on the stack; the conformer
has no padding mask (the code carries a TODO on it), so a clip's embeddings, and its text, change with
the clips that happen to share its step. Measured on the tiny checkpoints: 2-3 of 6 clips kept their
one-at-a-time text when batched. This plugin wraps `embed_multimodal` so that each group of clips with
the same feature length is encoded on its own (no padding), as the transformers engine does
(model.py `_encode`); every batching then gives the one-at-a-time text (tests/test_vllm.py).

vLLM loads it in every process that runs a model (the engine core, workers, Ray actors) through the
package's entry point: `[project.entry-points."vllm.general_plugins"]` in pyproject.toml.
`VLLM_PLUGINS` (a comma-separated list of plugin names) can leave it out.
"""

from __future__ import annotations

from collections import defaultdict

# The entry point's name in pyproject.toml (what VLLM_PLUGINS names).
PLUGIN_NAME = "granite_batch_batch_invariance"
_STOCK = "_granite_batch_stock_embed_multimodal"


def register() -> None:
    """vLLM's general-plugin hook: patch Granite Speech (and the plus model, its subclass). Idempotent."""
    from vllm.model_executor.models.granite_speech import GraniteSpeechForConditionalGeneration as model_class

    if getattr(model_class, _STOCK, None) is None:
        setattr(model_class, _STOCK, model_class.embed_multimodal)
        model_class.embed_multimodal = _embed_by_length


def unregister() -> None:
    """Restore stock vLLM's encoding (tests use it to show what the plugin changes)."""
    from vllm.model_executor.models.granite_speech import GraniteSpeechForConditionalGeneration as model_class

    stock = getattr(model_class, _STOCK, None)
    if stock is not None:
        model_class.embed_multimodal = stock
        setattr(model_class, _STOCK, None)


def _embed_by_length(self, **kwargs):
    """Stock `embed_multimodal` once per group of equal feature lengths; embeddings in input order."""
    stock = getattr(type(self), _STOCK)
    features = kwargs.get("input_features")
    sizes = kwargs.get("audio_embed_sizes")
    if not isinstance(features, list | tuple) or len(features) < 2 or sizes is None:
        return stock(self, **kwargs)  # one clip, or clips of one length stacked already: nothing padded
    groups: dict[int, list[int]] = defaultdict(list)
    for index, clip in enumerate(features):
        groups[clip.shape[-2]].append(index)
    if len(groups) == 1:
        return stock(self, **kwargs)
    sizes = sizes.reshape(len(features), -1)
    embeddings: list = [None] * len(features)
    for members in groups.values():
        # The mask is rebuilt from the group's own sizes (stock code does so when it is absent).
        group = {key: value for key, value in kwargs.items() if key != "input_features_mask"}
        group["input_features"] = [features[i] for i in members]
        group["audio_embed_sizes"] = sizes[members]
        for index, embedding in zip(members, stock(self, **group)):
            embeddings[index] = embedding
    return embeddings
