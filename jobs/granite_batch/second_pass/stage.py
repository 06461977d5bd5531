"""The second-pass stage on Arrow tables: transcript rows in, language-model outputs out.

Granite Speech transcribes; reasoning over the transcript is a separate call to a language model.

    OUTPUT/transcripts/ (id, language, text, error)       read, never rewritten
      -> prompt from a template; the transcript delimited and neutralised (second_pass_prompts.py)
      -> transcripts longer than the context: map over chunks, then reduce (never truncated)
      -> batched greedy generation, left padding        (language_model.py; actor pool in pipeline/)
      -> OUTPUT/second_pass/<name>/language=<lang>/part-<run_id>-<n>.parquet
         OUTPUT/second_pass/<name>/_runs/<run_id>.json   (a summary per run; `_` keeps it out of the dataset)
"""

from __future__ import annotations

import logging

import pyarrow as pa

from granite_batch.models.hub import first_line
from granite_batch.second_pass.language_model import LanguageModel
from granite_batch.second_pass.prompts import ContextTooSmall, Prompter

log = logging.getLogger(__name__)


def second_pass_table(batch: pa.Table, lm: LanguageModel, prompter: Prompter) -> pa.Table:
    """Map transcript rows (id, language, text) to (id, language, output, error, chunked).

    A transcript whose prompt does not fit the context is cut into chunks, each processed ("map"),
    and the outputs combined ("reduce", in as many levels as needed); `chunked` says so. A batch
    that fails is redone row by row, so one bad row only fails itself.
    """
    texts = batch.column("text").to_pylist()
    try:
        outputs, errors, chunked = _process(texts, lm, prompter)
    except Exception:
        log.warning("second pass failed on a batch of %d; redoing it one row at a time", len(texts), exc_info=True)
        outputs, errors, chunked = [], [], []
        for text in texts:
            try:
                (output,), (error,), (was_chunked,) = _process([text], lm, prompter)
            except Exception as exc:
                output, error, was_chunked = None, f"generation failed: {type(exc).__name__}: {first_line(exc)}", False
            outputs.append(output)
            errors.append(error)
            chunked.append(was_chunked)
    return pa.table(
        {
            "id": batch.column("id"),
            "language": batch.column("language").cast(pa.string()),
            "output": pa.array(outputs, pa.string()),
            "error": pa.array(errors, pa.string()),
            "chunked": pa.array(chunked, pa.bool_()),
        }
    )


def _process(texts: list[str], lm: LanguageModel, prompter: Prompter):
    n = len(texts)
    outputs: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    chunked = [False] * n
    requests: list[tuple[int, str]] = []
    for row, text in enumerate(texts):
        content = prompter.escape(text)
        prompt = prompter.prompt("whole", content)
        if lm.count(prompt) <= lm.prompt_budget:
            requests.append((row, prompt))
            continue
        chunked[row] = True
        try:
            requests += [(row, p) for p in prompter.map_prompts(content, lm.prompt_budget)]
        except ContextTooSmall as exc:
            errors[row] = str(exc)
    pending: dict[int, list[str]] = {}
    for (row, _), result in zip(requests, lm.generate([p for _, p in requests])):
        if chunked[row]:
            pending.setdefault(row, []).append(result)
        else:
            outputs[row] = result
    while pending:  # each level combines at least two notes into one, so this ends
        requests = []
        for row, notes in pending.items():
            if len(notes) == 1:
                outputs[row] = notes[0]
                continue
            try:
                prompts = prompter.reduce_prompts(notes, lm.prompt_budget)
            except ContextTooSmall as exc:
                errors[row] = str(exc)
                continue
            if len(prompts) >= len(notes):
                errors[row] = (
                    f"context too small: {lm.context_tokens} tokens cannot combine the notes of "
                    f"{len(notes)} parts; lower max_new_tokens"
                )
                continue
            requests += [(row, p) for p in prompts]
        pending = {}
        for (row, _), result in zip(requests, lm.generate([p for _, p in requests])):
            pending.setdefault(row, []).append(result)
    return outputs, errors, chunked
