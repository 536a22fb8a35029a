"""Search by example: the dictionary features most active on a span of a text.

    hits = search_span(model, tokenizer, dictionary, "def main(argv):", (4, 8), unit="char",
                       feature_max=maxima, top_k=10)

The text is run through the model up to the dictionary's hook and encoded. The span (characters
``[start, end)``, or tokens ``[start, end)``) covers the tokens it overlaps. Each feature's
activation on the span is its largest activation over those tokens; features are ranked by
that activation relative to their typical maximum (their recorded maximum activation, from
the dictionary's statistics) — so a feature at 90% of what it ever reaches outranks a
louder one at 10% of its usual — or, with ``rank_by="activation"`` (or no statistics), by the
activation itself. Features with no recorded maximum come after those with one.
"""

from __future__ import annotations

import torch

from editing.nethook import Trace


class SpanError(ValueError):
    """A span that does not fit the text; ``param`` names the field."""

    def __init__(self, message: str, param: str = "span"):
        super().__init__(message)
        self.param = param


def tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(pair) for pair in encoded["offset_mapping"]]


def span_tokens(offsets: list[tuple[int, int]], start: int, end: int, unit: str, text_length: int) -> tuple[int, int]:
    """The token range ``[first, last)`` a span covers."""
    if start >= end:
        raise SpanError(f"span: start ({start}) must be less than end ({end})", "span.end")
    if unit == "token":
        if end > len(offsets):
            raise SpanError(f"span: end {end} is past the text's {len(offsets)} tokens", "span.end")
        return start, end
    if end > text_length:
        raise SpanError(f"span: end {end} is past the text's {text_length} characters", "span.end")
    covered = [i for i, (lo, hi) in enumerate(offsets) if lo < end and hi > start]
    if not covered:
        raise SpanError(f"span: characters [{start}, {end}) cover no token", "span")
    return covered[0], covered[-1] + 1


@torch.no_grad()
def search_span(model, tokenizer, dictionary, text: str, span: tuple[int, int], *, unit: str = "char",
                feature_max: torch.Tensor | None = None, top_k: int = 10, rank_by: str = "relative") -> dict:
    ids, offsets = tokenize_with_offsets(tokenizer, text)
    if not ids:
        raise SpanError("text: the text has no tokens", "text")
    first, last = span_tokens(offsets, span[0], span[1], unit, len(text))
    device = next(model.parameters()).device
    with Trace(model, dictionary.config.hook, stop=True) as trace:
        model(input_ids=torch.tensor([ids], device=device))
    acts = dictionary.encode(trace.output[0, first:last]).float().cpu()  # (span tokens, F)
    peak, where = acts.max(0)  # (F,)
    mean = acts.mean(0)
    ranking = "relative" if rank_by == "relative" and feature_max is not None else "activation"
    if ranking == "relative":
        known = feature_max > 0
        relative = torch.where(known, peak / feature_max.clamp(min=1e-12), torch.zeros_like(peak))
        # features with a recorded maximum first (by the ratio), then the others (by activation)
        key = torch.where(known, relative + peak.max() + 1, peak)
    else:
        relative, key = None, peak
    order = [int(i) for i in key.argsort(descending=True) if peak[i] > 0][:top_k]
    hits = []
    for i in order:
        hit = {"feature": i, "activation": float(peak[i]), "mean_activation": float(mean[i]),
               "position": first + int(where[i]), "token": tokenizer.decode([ids[first + int(where[i])]])}
        if feature_max is not None:
            maximum = float(feature_max[i])
            hit["typical_max"] = maximum
            hit["relative"] = float(peak[i]) / maximum if maximum > 0 else None
        hits.append(hit)
    return {"span": {"tokens": [first, last], "chars": [offsets[first][0], offsets[last - 1][1]],
                     "text": text[offsets[first][0] : offsets[last - 1][1]]},
            "tokens": [tokenizer.decode([t]) for t in ids], "ranked_by": ranking, "features": hits}
