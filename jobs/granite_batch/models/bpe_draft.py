"""granite-speech-4.1-2b's BPE CTC head, for self-speculative drafts (speculative.py's modes).

After IBM's `granite/run_eval_speculative_bpe.py` (huggingface/open_asr_leaderboard, the script behind
the leaderboard row of granite-speech-4.1-2b): the 4.1 encoder is "dual-head" (its card: "a novel
dual-head CTC encoder with both graphemic and BPE outputs"); the grapheme heads (`out`, `out_mid`) are
in the model, the BPE head `out_llm` (a linear layer from the encoder's hidden size to the Granite
vocabulary + 1) is a separate file of the checkpoint, `out_llm.safetensors`. Its draft:

1. capture the output of encoder layer `num_layers // 2 - 1` with a forward hook, and take
   `importance = 1 - P(blank)` from the grapheme head `out` over it. (The encoder adds its
   self-conditioning feedback to that very tensor in place right after, so the hook's tensor holds
   the feedback as well; this reproduces IBM's script, not its comment);
2. pool the final encoder states 4:1, each window a weighted mean by importance
   (`posterior_weighted_pool`), over the valid `ceil(enc_len / 4)` windows;
3. greedy CTC over `out_llm` of the pooled states: label 0 is the blank, label i is Granite token i-1;
   the draft's uncertainty is its largest per-window entropy (infinite for an empty draft).

IBM's settings for 4.1 (`run_speculative_bpe.sh`): CTC threshold 0.0, verification 0.4, 2 fallback beams.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

log = logging.getLogger(__name__)

BPE_HEAD_FILE = "out_llm.safetensors"
POOL_WINDOW = 4  # IBM: LLM_DOWNSAMPLE_WINDOW
HOP_LENGTH = 160


def posterior_weighted_pool(hidden, importance, window: int = POOL_WINDOW):
    """[batch, frames, dim] states pooled `window`:1, each window the importance-weighted mean of its
    frames (zero-padded at the end), as IBM's `posterior_weighted_pool`."""
    import torch.nn.functional as F

    batch, frames, dim = hidden.shape
    pad = (window - frames % window) % window
    if pad:
        hidden = F.pad(hidden, (0, 0, 0, pad))
        importance = F.pad(importance, (0, pad))
    windows = hidden.shape[1] // window
    hidden = hidden.view(batch, windows, window, dim)
    importance = importance.view(batch, windows, window)
    weights = importance / (importance.sum(dim=-1, keepdim=True) + 1e-8)
    return (hidden * weights.unsqueeze(-1)).sum(dim=2)


class BpeDraftHead:
    """The 4.1 BPE CTC head on top of a loaded Granite Speech model's encoder."""

    def __init__(self, head, encoder):
        self.head = head  # torch.nn.Linear(hidden_dim, vocab + 1)
        self.encoder = encoder
        self._mid = None

    @contextlib.contextmanager
    def capture(self):
        """Within: an encoder pass keeps its mid-layer output for the importance weights."""
        layer = self.encoder.layers[self.encoder.config.num_layers // 2 - 1]

        def keep(module, args, output):
            self._mid = output[0] if isinstance(output, tuple) else output

        handle = layer.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def pooled_logits(self, encoded, samples: list[int]) -> list:
        """Per row of `encoded` (the final encoder states of the pass just captured): the BPE logits
        of its valid pooled windows (`samples`: each row's audio length)."""
        import torch

        importance = 1.0 - torch.softmax(self.encoder.out(self._mid).float(), dim=-1)[:, :, 0]
        pooled = posterior_weighted_pool(encoded, importance.to(encoded.dtype))
        rows = []
        for row, n in enumerate(samples):
            encoder_frames = min(n // HOP_LENGTH // 2 + 1, encoded.shape[1])
            windows = min(math.ceil(encoder_frames / POOL_WINDOW), pooled.shape[1])
            rows.append(self.head(pooled[row, :windows].to(self.head.weight.dtype)))
        return rows

    @staticmethod
    def draft(logits, tokenizer) -> tuple[str, float]:
        """(draft text, max window entropy) of one row's pooled BPE logits, by greedy CTC."""
        import torch

        probs = torch.softmax(logits.float(), dim=-1)
        labels = torch.unique_consecutive(probs.argmax(dim=-1))
        tokens = [label - 1 for label in labels.tolist() if label > 0]  # label i is Granite token i - 1
        if not tokens:
            return "", math.inf
        entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=-1).max().item()
        return tokenizer.decode(tokens), entropy


def load_bpe_head(name: str, revision: str | None, model, device: str) -> BpeDraftHead | None:
    """The checkpoint's `out_llm.safetensors` as a BpeDraftHead on `model`'s encoder, or None (with a
    warning) when the checkpoint has no such file."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(name, BPE_HEAD_FILE)
    if not os.path.isfile(path):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id=name, filename=BPE_HEAD_FILE, revision=revision)
        except Exception as exc:  # offline, or a checkpoint without the file
            log.warning(
                "no %s for %s (%s): drafts are not made; rows decode autoregressively",
                BPE_HEAD_FILE,
                name,
                str(exc).splitlines()[0][:200],
            )
            return None
    weights = load_file(path)
    out_dim, in_dim = weights["weight"].shape
    head = torch.nn.Linear(in_dim, out_dim, bias="bias" in weights)
    head.load_state_dict(weights)
    encoder = model.model.encoder
    return BpeDraftHead(head.to(device=device, dtype=model.dtype).eval(), encoder)
