"""The running batch: every row's state by slot, and the two forwards a scheduler step runs.

Slots ``0..n_decode-1`` are decoding rows (each feeds back its last token), the slots after
them are rows still reading their prompt, oldest first. Per-slot tensors (the token to
feed, sampling settings, the row's own step count), the key/value cache
(:mod:`editing.engine.kv_cache`), the per-dictionary edit tables
(:mod:`editing.engine.edit_tables`) and the per-hook-point steering-vector tables
(:mod:`editing.engine.vector_tables`) are all indexed by slot, and :meth:`RunningBatch.reorder`
moves them together when rows join, finish their prompt or leave — TGI's
``filter``/``concatenate`` with the edit tables travelling with their rows, as its
heterogeneous sampling parameters do.

    batch.add(sequence)                        # joins at the end of the prompt region
    tokens, logprobs, tops = batch.decode()    # one token for every decoding row
    firsts = batch.prefill(count, chunk)       # the next chunk of the first `count` prompt rows
    batch.reorder(decoding, promoted, prompt)  # who stays, in which region, in which order

Scoring: a row whose sequence asks for it (``score_prompt``) gets the log-probability of
every prompt token from the prefill forwards that read its prompt — each chunk's hidden
states predict the chunk's next tokens, so nothing is kept between chunks — and rows that
ask for ``top_n`` alternatives get the N most likely tokens at every scored position, prompt
and generated. The LM head runs over every prompt position only for the rows that score;
the others still get logits at their last prompt position alone.
"""

from __future__ import annotations

import torch

from editing.edits import hook_rank
from editing.engine.conditions import ConditionBoard, condition_index
from editing.engine.edit_tables import GENERATED, PROMPT, DictionaryTable, Window
from editing.engine.editors import edit_hooks, point_editors
from editing.engine.kv_cache import SlotCache
from editing.engine.sampling import RowSampling, sample
from editing.engine.vector_tables import VectorTable

_SLOT_TENSORS = {"next_token": torch.long, "temperature": torch.float32, "top_k": torch.long,
                 "top_p": torch.float32, "seeds": torch.long, "steps": torch.long}


def hook_order(table) -> tuple:
    """Tables run in layer order (a layer's input before its output), dictionaries by name, then
    the steering vectors of that hook point."""
    return (*hook_rank(table.hook), isinstance(table, VectorTable), table.name, id(table))


class RunningBatch:
    def __init__(self, model, max_rows: int, pad_id: int):
        self.model = model
        self.body, self.head = model.base_model, model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.pad_id = pad_id
        self.cache = SlotCache(model.config, next(model.parameters()).dtype, self.device, max_rows)
        self.sequences: list = []  # by slot
        self.n_decode = 0
        self.slot_tensors = {name: torch.zeros(0, dtype=dtype, device=self.device) for name, dtype in _SLOT_TENSORS.items()}
        self.tables: dict[int, DictionaryTable] = {}  # id(dictionary) -> its table
        self.vector_tables: dict[str, VectorTable] = {}  # hook point -> its steering-vector table
        self.board = ConditionBoard(self.device)  # where each row's conditions hold, a forward at a time
        self.layout = 0  # bumped whenever rows change slots
        self.decode_top_n = 0  # the most top-N alternatives a decoding row asks for (set with the layout)

    @property
    def n_rows(self) -> int:
        return len(self.sequences)

    @property
    def n_prefill(self) -> int:
        return self.n_rows - self.n_decode

    # --- rows ---------------------------------------------------------------------------------

    def _grow(self, rows: int) -> None:
        for name, tensor in self.slot_tensors.items():
            if tensor.shape[0] < rows:
                grown = torch.zeros(max(rows, 2 * tensor.shape[0], 4), dtype=tensor.dtype, device=self.device)
                grown[: tensor.shape[0]] = tensor
                self.slot_tensors[name] = grown

    def add(self, sequence) -> None:
        """A row joins at the end of the prompt region with its sampling settings and edits."""
        slot = self.n_rows
        self._grow(slot + 1)
        self.cache.reserve(slot + 1, 0)
        self.cache.clear(slot)
        values = {"next_token": 0, "temperature": sequence.temperature, "top_k": sequence.top_k,
                  "top_p": sequence.top_p, "seeds": sequence.seed, "steps": 0}
        for name, value in values.items():
            self.slot_tensors[name][slot] = value
        readout_name, readout_k = sequence.readout or (None, 0)
        conditions = condition_index(sequence.edits)
        self.board.reserve(len(conditions))
        for name, dictionary in sequence.dictionaries.items():
            table = self.tables.get(id(dictionary))
            if table is None:
                table = self.tables[id(dictionary)] = DictionaryTable(name, dictionary, self.device)
            table.add_row(slot, [edit for edit in sequence.edits if edit.dictionary == name],
                          readout_k if name == readout_name else 0, len(sequence.prompt) + sequence.max_new_tokens,
                          conditions=conditions, sources={c: k for c, k in conditions.items() if c.dictionary == name},
                          feature_max=sequence.feature_max.get(name))
        for hook, edits in _vector_edits_by_hook(sequence).items():
            table = self.vector_tables.get(hook)
            if table is None:
                table = self.vector_tables[hook] = VectorTable(hook, self.device)
            table.add_row(slot, edits, sequence.vectors, conditions)
        sequence.slot = slot
        self.sequences.append(sequence)
        self.layout += 1

    def reorder(self, decoding: list, promoted: list, prompt: list) -> None:
        """The new layout: ``decoding`` rows that stay (kept where they are where possible, the
        freed slots below filled from the top), then ``promoted`` rows that finished their
        prompt, then the ``prompt`` rows still reading it, in order. Every other row leaves."""
        stay = len(decoding)
        low = sorted(s.slot for s in decoding if s.slot < stay)
        holes = sorted(set(range(stay)) - set(low))
        order: list = [None] * stay
        for sequence in decoding:
            if sequence.slot < stay:
                order[sequence.slot] = sequence
        movers = [s for s in decoding if s.slot >= stay]
        for hole, sequence in zip(holes, movers):
            order[hole] = sequence
        order += promoted + prompt
        destination = [slot for slot, sequence in enumerate(order) if sequence.slot != slot]
        source = [order[slot].slot for slot in destination]
        if destination:
            dst = torch.tensor(destination, dtype=torch.long, device=self.device)
            src = torch.tensor(source, dtype=torch.long, device=self.device)
            self.cache.move(dst, src)
            for tensor in self.slot_tensors.values():
                tensor[dst] = tensor[src]
            for table in self._all_tables():
                table.move(dst, src)
        left = self.n_rows - len(order)
        for slot in range(len(order), self.n_rows):
            self.cache.clear(slot)
            for table in self._all_tables():
                table.clear(slot)
        for slot, sequence in enumerate(order):
            sequence.slot = slot
        self.sequences, self.n_decode = order, stay + len(promoted)
        self.decode_top_n = max((s.top_n for s in order[: self.n_decode]), default=0)
        self.layout += 1
        if left:
            for key in [key for key, table in self.tables.items() if not table.in_use()]:
                del self.tables[key]
            for key in [key for key, table in self.vector_tables.items() if not table.in_use()]:
                del self.vector_tables[key]
            for table in self.tables.values():
                table.drop_unused_features()
        if not self.sequences:
            self.cache.release()

    # --- forwards -------------------------------------------------------------------------------

    def _forward(self, input_ids: torch.Tensor, window: Window, new_tokens: int) -> torch.Tensor:
        """The body of the model over the window's rows with the edit hooks of its tables:
        ``input_ids (R, T)`` → final hidden states ``(R, T, d)``."""
        mask, positions = self.cache.window(window.lo, window.hi, new_tokens)
        with edit_hooks(self.model, point_editors(self.tables.values(), self.vector_tables.values(), self.board, window)):
            output = self.body(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                               use_cache=True)
        return output.last_hidden_state

    def _sampling(self, rows: torch.Tensor | slice) -> RowSampling:
        t = self.slot_tensors
        if isinstance(rows, slice):
            return RowSampling(t["temperature"][rows], t["top_k"][rows], t["top_p"][rows], t["seeds"][rows], t["steps"][rows])
        return RowSampling(t["temperature"], t["top_k"], t["top_p"], t["seeds"], t["steps"]).select(rows)

    def _sample(self, hidden: torch.Tensor, rows: torch.Tensor | slice, top_n: int = 0):
        """Sample each row's next token from ``hidden (n, d)``: ``(tokens, logprobs, tops)``; ``tops``
        holds the ``top_n`` most likely ``(id, log p)`` a row, or is None when no row asks."""
        logits = self.head(hidden).float()  # (n, V)
        tokens = sample(logits, self._sampling(rows))  # (n,)
        log_probs = logits.log_softmax(-1)  # (n, V)
        logprobs = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return tokens, logprobs, _top(log_probs, top_n)

    def decode(self) -> tuple[list[int], list[float], list | None]:
        """One step of every decoding row: feed its last token, sample the next."""
        lo, hi = 0, self.n_decode
        window = Window(lo, hi, GENERATED, layout=self.layout)
        hidden = self._forward(self.slot_tensors["next_token"][lo:hi].unsqueeze(1), window, 1)  # (R, 1, d)
        self.cache.advance(lo, hi, 1)
        tokens, logprobs, tops = self._sample(hidden[:, -1], slice(lo, hi), self.decode_top_n)
        self.slot_tensors["next_token"][lo:hi] = tokens
        self.slot_tensors["steps"][lo:hi] += 1
        return tokens.tolist(), logprobs.tolist(), tops

    def prefill(self, count: int, chunk: int) -> list[tuple]:
        """The next ``chunk`` (at most) prompt tokens of the first ``count`` prompt rows, in one
        right-padded forward. Returns ``(sequence, first_token, logprob)`` for the rows whose
        prompt is now complete (their first token is sampled from its last position), and the
        ``top_n`` alternatives there (None when no such row asks). Rows that score their prompt
        get this chunk's prompt log-probabilities appended to their sequence."""
        lo, hi = self.n_decode, self.n_decode + count
        rows = self.sequences[lo:hi]
        counts = [min(len(s.prompt) - s.prefilled, chunk) for s in rows]
        steps = max(counts)
        input_ids = torch.full((count, steps), self.pad_id, dtype=torch.long)  # (R, T)
        real = torch.zeros(count, steps, dtype=torch.bool)
        for r, (sequence, n) in enumerate(zip(rows, counts)):
            input_ids[r, :n] = torch.tensor(sequence.prompt[sequence.prefilled : sequence.prefilled + n])
            real[r, :n] = True
        counts_t = torch.tensor(counts, dtype=torch.long, device=self.device)
        window = Window(lo, hi, PROMPT, real=real.to(self.device), counts=counts_t, layout=self.layout)
        hidden = self._forward(input_ids.to(self.device), window, steps)  # (R, T, d)
        self.cache.advance(lo, hi, counts_t)
        scoring = [r for r, sequence in enumerate(rows) if sequence.score_prompt]
        if scoring:
            self._score_prompts(hidden, rows, counts, scoring)
        complete = []
        for r, (sequence, n) in enumerate(zip(rows, counts)):
            sequence.prefilled += n
            if sequence.prefilled == len(sequence.prompt):
                complete.append(r)
        if not complete:
            return []
        index = torch.tensor(complete, dtype=torch.long, device=self.device)
        last = hidden[index, counts_t.index_select(0, index) - 1]  # (n, d)
        tokens, logprobs, tops = self._sample(last, index + lo, max(rows[r].top_n for r in complete))
        self.slot_tensors["next_token"][index + lo] = tokens
        self.slot_tensors["steps"][index + lo] = 1
        tops = tops or [None] * len(complete)
        return [(rows[r], token, logprob, top)
                for r, token, logprob, top in zip(complete, tokens.tolist(), logprobs.tolist(), tops)]

    def _score_prompts(self, hidden: torch.Tensor, rows: list, counts: list[int], scoring: list[int]) -> None:
        """Append to each scoring row the log-probabilities of the prompt tokens its chunk predicts
        (position ``j`` of a chunk starting at ``s`` predicts ``prompt[s + j + 1]``), and their
        top-N alternatives; a row's first prompt token has none (None). Called before ``prefilled``
        moves on. The head runs over these rows' real positions only."""
        width = max(counts[r] for r in scoring)
        index = torch.tensor(scoring, dtype=torch.long, device=self.device)
        log_probs = self.head(hidden.index_select(0, index)[:, :width]).float().log_softmax(-1)  # (r, T', V)
        targets = torch.zeros(len(scoring), width, dtype=torch.long)
        wanted = []  # (row, start, predicted tokens)
        for i, r in enumerate(scoring):
            sequence = rows[r]
            start = sequence.prefilled
            following = sequence.prompt[start + 1 : start + counts[r] + 1]
            targets[i, : len(following)] = torch.tensor(following, dtype=torch.long)
            wanted.append((sequence, start, len(following)))
        chosen = log_probs.gather(-1, targets.to(self.device).unsqueeze(-1)).squeeze(-1).tolist()  # (r, T')
        top_n = max(sequence.top_n for sequence, _, _ in wanted)
        tops = _top(log_probs.flatten(0, 1), top_n)  # (r·T') lists, or None
        for i, (sequence, start, n) in enumerate(wanted):
            if start == 0:
                sequence.prompt_scores.append(None)
                sequence.prompt_top.append(None)
            sequence.prompt_scores.extend(chosen[i][:n])
            if sequence.top_n:
                sequence.prompt_top.extend(top[: sequence.top_n] for top in tops[i * width : i * width + n])

    # --- results ----------------------------------------------------------------------------

    def _all_tables(self) -> list:
        return [*self.tables.values(), *self.vector_tables.values()]

    def table_of(self, dictionary) -> DictionaryTable:
        return self.tables[id(dictionary)]

    def vector_reports(self, sequence) -> list[tuple]:
        """``(table, report)`` for each hook point where ``sequence`` has vector edits."""
        return [(self.vector_tables[hook], self.vector_tables[hook].report(sequence.slot, edits))
                for hook, edits in _vector_edits_by_hook(sequence).items()]


def _vector_edits_by_hook(sequence) -> dict[str, list]:
    """A row's steering-vector edits, by the hook point of each vector."""
    by_hook: dict[str, list] = {}
    for edit in sequence.edits:
        if edit.op == "vector":
            by_hook.setdefault(sequence.vectors[edit.vector].hook, []).append(edit)
    return by_hook


def _top(log_probs: torch.Tensor, n: int) -> list[list[tuple[int, float]]] | None:
    """The ``n`` most likely ``(token id, log p)`` of each row of ``log_probs (R, V)``, best first."""
    if not n:
        return None
    top = log_probs.topk(min(n, log_probs.shape[-1]), dim=-1)
    return [list(zip(ids, values)) for ids, values in zip(top.indices.tolist(), top.values.tolist())]
