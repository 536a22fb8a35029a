"""The batched generation engine: every request carries its own feature edits.

    engine = Engine(loaded.model, loaded.tokenizer, {"l2": dictionary})
    [result] = engine.generate([GenerationRequest("def main(", max_new_tokens=16,
                                                  edits=(EditSpec(dictionary="l2", feature=7, op="ablate"),),
                                                  include_baseline=True)])
    result.text, result.edit_report, result.baseline.text

All requests of a call run together: one forward a step over a left-padded batch with an
attention mask and a KV cache. Each request's edits are applied inside the dictionary
hooks by row-indexed tensor operations (:mod:`editing.edit_plan`); rows without edits are
not touched, so an unedited request is the plain model. A baseline asked for with
``include_baseline`` is one more row of the same batch. Sampling settings are per-row
tensors and seeded draws depend only on ``(seed, step)`` (:mod:`editing.sampling`).

The engine takes plain parameters (:class:`GenerationRequest`); the HTTP layer converts
its wire format into them.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field

import torch

from editing.edit_plan import GENERATED, PAD, PROMPT, DictionaryHook, StepContext
from editing.edits import EditError, EditSpec, validate_edits
from editing.hookpoints import parse_hook_name
from editing.nethook import Trace
from editing.sampling import RowSampling, sample


class EngineError(EditError):
    """A request the caller got wrong; ``param`` names the field."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | tuple[int, ...]
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    edits: tuple[EditSpec, ...] = ()
    include_baseline: bool = False
    return_features: tuple[str, int] | None = None  # (dictionary, top_k)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks, fixed-length outputs)


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    logprobs: list[float]  # log p(token) under the model's (edited) distribution, before temperature
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: list[int]
    edit_report: list[dict] = field(default_factory=list)
    features: list[dict] | None = None
    baseline: "GenerationResult | None" = None


@dataclass
class _Row:
    request: int
    prompt: list[int]
    edits: tuple[EditSpec, ...]
    readout: tuple[str, int] | None
    max_new_tokens: int
    stop: tuple[str, ...]
    ignore_eos: bool = False
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None
    fed: int = 0  # generated tokens fed back into the model


class Engine:
    def __init__(self, model, tokenizer, dictionaries: dict | None = None, *, max_positions: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_positions = max_positions or int(model.config.max_position_embeddings)
        self.dictionaries: dict = {}
        for name, dictionary in (dictionaries or {}).items():
            self.add_dictionary(name, dictionary)

    # --- dictionaries -------------------------------------------------------------------------

    def add_dictionary(self, name: str, dictionary) -> None:
        """Serve ``dictionary`` under ``name``; refused if it does not fit the model."""
        config = dictionary.config
        layer, _ = parse_hook_name(config.hook)
        n_layers, width = self.model.config.num_hidden_layers, self.model.config.hidden_size
        if layer >= n_layers or config.d_in != width:
            raise EditError(f"dictionary {name!r} ({config.hook}, d_in {config.d_in}) does not fit this "
                            f"{n_layers}-layer model of width {width}", "dictionary")
        self.dictionaries[name] = dictionary.to(self.device)

    def remove_dictionary(self, name: str) -> None:
        self.dictionaries.pop(name, None)

    # --- validation ---------------------------------------------------------------------------

    def _prompt_ids(self, prompt, index: int) -> list[int]:
        where = f"requests[{index}].prompt"
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise EngineError(f"{where}: token ids must be in [0, {vocab})", where)
        if not ids:
            raise EngineError(f"{where}: the prompt is empty", where)
        return ids

    def validate(self, request: GenerationRequest, index: int = 0) -> list[int]:
        """Check a request against the model and dictionaries; return its prompt's token ids."""
        where = f"requests[{index}]"
        ids = self._prompt_ids(request.prompt, index)
        if request.max_new_tokens < 1:
            raise EngineError(f"{where}.max_new_tokens must be at least 1", f"{where}.max_new_tokens")
        if len(ids) + request.max_new_tokens > self.max_positions:
            raise EngineError(f"{where}: {len(ids)} prompt tokens + {request.max_new_tokens} new tokens exceed the "
                              f"model's {self.max_positions} positions", f"{where}.max_new_tokens")
        if not request.temperature >= 0:
            raise EngineError(f"{where}.temperature must be >= 0", f"{where}.temperature")
        if not 0 < request.top_p <= 1:
            raise EngineError(f"{where}.top_p must be in (0, 1]", f"{where}.top_p")
        if request.top_k < 0:
            raise EngineError(f"{where}.top_k must be >= 0", f"{where}.top_k")
        validate_edits(request.edits, self.dictionaries, f"{where}.edits")
        if request.return_features is not None:
            name, top_k = request.return_features
            if name not in self.dictionaries:
                raise EngineError(f"{where}.return_features: unknown dictionary {name!r}", f"{where}.return_features.dictionary")
            if not 1 <= top_k <= self.dictionaries[name].config.d_sae:
                raise EngineError(f"{where}.return_features.top_k must be in [1, d_sae]", f"{where}.return_features.top_k")
        return ids

    # --- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], *, use_cache: bool = True,
                 on_step=None) -> list[GenerationResult]:
        """Generate all ``requests`` together. ``on_step(progress)``, if given, is called after
        every step with one ``(tokens, finish_reason, text_if_stopped)`` a request (streaming)."""
        rows: list[_Row] = []
        baseline_of: dict[int, int] = {}
        seeds = []
        for index, request in enumerate(requests):
            ids = self.validate(request, index)
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            common = dict(max_new_tokens=request.max_new_tokens, stop=tuple(request.stop), ignore_eos=request.ignore_eos)
            rows.append(_Row(index, ids, tuple(request.edits), request.return_features, **common))
            seeds.append(seed)
            if request.include_baseline:
                baseline_of[index] = len(rows)
                rows.append(_Row(index, ids, (), None, **common))
                seeds.append(seed)
        settings = RowSampling(
            temperature=torch.tensor([requests[r.request].temperature for r in rows], dtype=torch.float32),
            top_k=torch.tensor([requests[r.request].top_k for r in rows], dtype=torch.long),
            top_p=torch.tensor([requests[r.request].top_p for r in rows], dtype=torch.float32),
            seeds=torch.tensor(seeds, dtype=torch.long),
        ).to(self.device)

        n_rows, prompt_len = len(rows), max(len(r.prompt) for r in rows)
        max_new = max(r.max_new_tokens for r in rows)
        total = prompt_len + max_new
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((n_rows, total), pad_id, dtype=torch.long)  # (R, P + N)
        mask = torch.zeros(n_rows, total, dtype=torch.long)
        kinds = torch.full((n_rows, total), GENERATED, dtype=torch.int8)
        for i, row in enumerate(rows):
            start = prompt_len - len(row.prompt)
            input_ids[i, start:prompt_len] = torch.tensor(row.prompt)
            mask[i, start:] = 1
            kinds[i, :start] = PAD
            kinds[i, start:prompt_len] = PROMPT
        input_ids, mask, kinds = input_ids.to(self.device), mask.to(self.device), kinds.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (R, P + N)

        hooks = self._build_hooks(rows)
        baselines = set(baseline_of.values())
        main_rows = [i for i in range(n_rows) if i not in baselines]  # one a request, in request order
        eos = self.tokenizer.eos_token_id
        past = None
        with contextlib.ExitStack() as stack:
            for hook in hooks:
                stack.enter_context(Trace(self.model, hook.dictionary.config.hook, retain_output=False, edit_output=hook))
            for step in range(max_new):
                end = prompt_len + step
                start = 0 if (step == 0 or not use_cache) else end - 1
                context = StepContext(kinds=kinds[:, start:end], new_from=0 if use_cache or step == 0 else end - 1 - start,
                                      phase=PROMPT if step == 0 else GENERATED if use_cache else None)
                for hook in hooks:
                    hook.context = context
                output = self.model(input_ids=input_ids[:, start:end], attention_mask=mask[:, :end],
                                    position_ids=positions[:, start:end], past_key_values=past, use_cache=use_cache)
                past = output.past_key_values if use_cache else None
                logits = output.logits[:, -1].float()  # (R, V)
                next_tokens = sample(logits, settings, step)  # (R,)
                logprobs = logits.log_softmax(-1).gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
                input_ids[:, end] = next_tokens
                done = self._record(rows, step, next_tokens.tolist(), logprobs.tolist(), eos)
                if on_step is not None:
                    on_step([(rows[i].tokens, rows[i].finish_reason, rows[i].text) for i in main_rows])
                if done:
                    break
                for i, row in enumerate(rows):
                    if row.finish_reason is not None and step + 1 < max_new:
                        kinds[i, end:] = PAD  # nothing of a finished row is edited or read out
        results = [self._result(row, i, hooks, prompt_len) for i, row in enumerate(rows)]
        final = []
        for index in range(len(requests)):
            main = next(i for i, row in enumerate(rows) if row.request == index)
            result = results[main]
            if index in baseline_of:
                result.baseline = results[baseline_of[index]]
            final.append(result)
        return final

    def _build_hooks(self, rows: list[_Row]) -> list[DictionaryHook]:
        names = sorted({e.dictionary for r in rows for e in r.edits} | {r.readout[0] for r in rows if r.readout},
                       key=lambda n: (*self._order(self.dictionaries[n].config.hook), n))
        hooks = []
        for name in names:
            row_edits = {i: [e for e in r.edits if e.dictionary == name] for i, r in enumerate(rows)}
            readouts = {i: r.readout[1] for i, r in enumerate(rows) if r.readout and r.readout[0] == name}
            hooks.append(DictionaryHook(name, self.dictionaries[name], {i: e for i, e in row_edits.items() if e},
                                        readouts, self.device))
        return hooks

    @staticmethod
    def _order(hook: str) -> tuple[int, int]:
        layer, kind = parse_hook_name(hook)
        return (layer, 0) if kind == "resid_pre" else (layer, 1)

    def _record(self, rows: list[_Row], step: int, tokens: list[int], logprobs: list[float], eos) -> bool:
        """Append this step's tokens; return True when every row has finished."""
        for row, token, logprob in zip(rows, tokens, logprobs):
            if row.finish_reason is not None:
                continue
            row.fed = step
            if token == eos and not row.ignore_eos:
                row.finish_reason = "stop"
                continue
            row.tokens.append(token)
            row.logprobs.append(logprob)
            if row.stop:
                text = self.tokenizer.decode(row.tokens)
                hits = [text.find(s) for s in row.stop if s and s in text]
                if hits:
                    row.text, row.finish_reason = text[: min(hits)], "stop"
                    continue
            if len(row.tokens) >= row.max_new_tokens:
                row.finish_reason = "length"
        return all(row.finish_reason is not None for row in rows)

    def _result(self, row: _Row, index: int, hooks: list[DictionaryHook], prompt_len: int) -> GenerationResult:
        report = [hook.report(index, [e for e in row.edits if e.dictionary == hook.name])
                  for hook in hooks if any(e.dictionary == hook.name for e in row.edits)]
        features = None
        if row.readout:
            hook = next(h for h in hooks if h.name == row.readout[0])
            values, indices = hook.features_of(index)
            start = prompt_len - len(row.prompt)
            sequence = row.prompt + row.tokens
            features = []
            for position in range(len(row.prompt) + row.fed):
                keep = values[start + position, : row.readout[1]] > 0
                features.append({
                    "position": position,
                    "token_id": sequence[position],
                    "token": self.tokenizer.decode([sequence[position]]),
                    "kind": "prompt" if position < len(row.prompt) else "generated",
                    "features": [{"feature": int(f), "activation": float(a)}
                                 for f, a in zip(indices[start + position, : row.readout[1]][keep],
                                                 values[start + position, : row.readout[1]][keep])],
                })
        return GenerationResult(
            text=row.text if row.text is not None else self.tokenizer.decode(row.tokens),
            tokens=row.tokens,
            logprobs=row.logprobs,
            finish_reason=row.finish_reason or "length",
            prompt_tokens=row.prompt,
            edit_report=report,
            features=features,
        )

    # --- inspection -------------------------------------------------------------------------------

    @torch.no_grad()
    def inspect(self, text: str, dictionary: str, top_k: int = 5) -> list[dict]:
        """The ``top_k`` active features of ``dictionary`` at each token of ``text``."""
        if dictionary not in self.dictionaries:
            raise EngineError(f"unknown dictionary {dictionary!r} (loaded: {', '.join(sorted(self.dictionaries)) or 'none'})",
                              "dictionary")
        ids = self._prompt_ids(text, 0)
        if len(ids) > self.max_positions:
            raise EngineError(f"text has {len(ids)} tokens; the model takes {self.max_positions}", "text")
        sae = self.dictionaries[dictionary]
        if not 1 <= top_k <= sae.config.d_sae:
            raise EngineError(f"top_k must be in [1, {sae.config.d_sae}]", "top_k")
        with Trace(self.model, sae.config.hook, stop=True) as trace:
            self.model(input_ids=torch.tensor([ids], device=self.device))
        acts = sae.encode(trace.output[0]).float()  # (T, d_sae)
        top = acts.topk(top_k, dim=-1)
        return [
            {"position": p, "token_id": ids[p], "token": self.tokenizer.decode([ids[p]]),
             "features": [{"feature": int(f), "activation": float(a)}
                          for f, a in zip(top.indices[p].tolist(), top.values[p].tolist()) if a > 0]}
            for p in range(len(ids))
        ]
