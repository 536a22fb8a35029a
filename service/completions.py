"""OpenAI-compatible completions on the engine: each prompt of a request becomes one engine
request (all batched by the same scheduler), each result one choice in OpenAI's layout.

    requests = engine_requests(server, body, edits)     # checked; an ApiError names the field
    choice = completion_choice(server, body, index, result)

With ``echo`` the choice's text starts with the prompt; with ``logprobs: N`` it carries
OpenAI's ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` over the echoed
prompt tokens (the first one's log-probability and alternatives are ``null``) and the
generated ones. ``top_logprobs`` maps token text to log-probability: the N most likely
tokens and the chosen one (so up to N + 1 entries, as OpenAI does). ``tokens`` are text
pieces that concatenate to ``text`` (a token that ends inside a UTF-8 character gives its
text to the next one), and ``text_offset`` is each piece's offset in ``text``. When a row
stops at end-of-text, that token — which the model did produce, though it has no text — is
listed last with an empty piece, so a completion of ``max_tokens`` 1 always lists one
generated token (lm-evaluation-harness reads ``token_logprobs[ctxlen:-1]``).
"""

from __future__ import annotations

from editing.edits import EditError
from editing.engine import GenerationRequest
from service.protocol import ApiError, CompletionRequest


def engine_requests(server, body: CompletionRequest, edits: list) -> list[GenerationRequest]:
    """One checked engine request a prompt, under ``edits`` (a preset's, then the request's)."""
    limits, tokenizer = server.limits, server.loaded.tokenizer
    if body.max_tokens > limits.max_new_tokens:
        raise ApiError(400, f"max_tokens is {body.max_tokens}; this server allows at most {limits.max_new_tokens}",
                       param="max_tokens")
    if body.logprobs is not None and body.logprobs > limits.max_logprobs:
        raise ApiError(400, f"logprobs is {body.logprobs}; this server returns at most {limits.max_logprobs} "
                            "alternatives a token", param="logprobs")
    if len(edits) > limits.max_edits:
        raise ApiError(400, f"{len(edits)} edits; this server allows at most {limits.max_edits}", param="edits")
    server.steering.sync_vectors(edits)  # the stored version of every steering vector named, as /v1/generate does
    prompts = body.prompts()
    requests = []
    for index, prompt in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"{where} is {len(ids)} tokens; this server allows at most {limits.max_prompt_tokens}",
                           param=where)
        request = GenerationRequest(
            prompt=tuple(ids), max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
            seed=body.seed, stop=tuple(body.stop or ()), edits=tuple(edits),
            # an echo of max_tokens 0 is a scoring request even without logprobs (it generates nothing)
            prompt_logprobs=body.echo and (body.logprobs is not None or body.max_tokens == 0),
            top_logprobs=body.logprobs or 0)
        try:
            server.engine.validate(request)
        except EditError as err:
            param = (err.param or "").replace("requests[0].prompt", where).replace("requests[0].", "") or None
            message = str(err).replace("requests[0].prompt", where).replace("requests[0].", "").replace("requests[0]", where)
            raise ApiError(400, message, param=param) from None
        requests.append(request)
    return requests


def prompt_pieces(server, ids: list[int]) -> list[str]:
    """One text piece a prompt token, concatenating to the decoded prompt."""
    from service.model_server import DeltaStreamer

    streamer = DeltaStreamer(server.loaded.tokenizer, [])
    return [streamer.update(ids[: i + 1], None if i + 1 < len(ids) else "length", None) for i in range(len(ids))]


def _alternatives(decode, chosen: int, chosen_logprob: float, top) -> dict[str, float]:
    """OpenAI's top_logprobs entry: the best tokens' text → log p, and the chosen token's."""
    entry: dict[str, float] = {}
    for token, logprob in top or []:
        entry.setdefault(decode([token]), logprob)
    entry.setdefault(decode([chosen]), chosen_logprob)
    return entry


def completion_choice(server, body: CompletionRequest, index: int, result) -> dict:
    """One choice of a completion response (OpenAI's layout, plus steerserve's ``edit_report``)."""
    decode = server.loaded.tokenizer.decode
    generated = server.text_pieces(result)
    prompt = prompt_pieces(server, result.prompt_tokens) if body.echo else []
    text = "".join(prompt) + result.text
    logprobs = None
    if body.logprobs is not None:
        pieces, token_logprobs, top_logprobs = [], [], []
        if body.echo:
            pieces += prompt
            token_logprobs += result.prompt_logprobs
            tops = result.prompt_top_logprobs or [None] * len(prompt)
            top_logprobs.append(None)
            top_logprobs += [_alternatives(decode, token, logprob, top) for token, logprob, top in
                             zip(result.prompt_tokens[1:], result.prompt_logprobs[1:], tops[1:])]
        tops = result.top_logprobs or [None] * len(result.tokens)
        pieces += generated
        token_logprobs += result.logprobs
        top_logprobs += [_alternatives(decode, token, logprob, top)
                         for token, logprob, top in zip(result.tokens, result.logprobs, tops)]
        if result.eos is not None:
            token, logprob, top = result.eos
            pieces.append("")
            token_logprobs.append(logprob)
            top_logprobs.append(_alternatives(decode, token, logprob, top))
        offsets, at = [], 0
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        logprobs = {"tokens": pieces, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                    "text_offset": offsets}
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": result.finish_reason,
            "edit_report": result.edit_report}


def completion_body(server, body: CompletionRequest, results: list) -> dict:
    """``choices`` and ``usage`` of a completion response (the ingress adds id, model and created)."""
    choices = [completion_choice(server, body, index, result) for index, result in enumerate(results)]
    prompt_tokens = sum(len(result.prompt_tokens) for result in results)
    completion_tokens = sum(len(result.tokens) for result in results)
    return {"choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens},
            "edit_report": choices[0]["edit_report"]}
