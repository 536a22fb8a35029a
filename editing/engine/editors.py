"""One hook per hook point: the tables that edit there, in their order.

At each hook point a :class:`PointEditor` runs, on the residual ``h`` arriving there:

1. every dictionary table's conditions (written to the condition board, read by this hook
   point and later ones), all on ``h`` as it arrived, before any edit here;
2. the dictionary tables' feature edits, in name order (each encodes the residual as the
   previous one left it; the first reuses its condition encode);
3. the steering-vector edits of this hook point (scaled, where asked, to the norm of the
   residual they are added to).

Hook points run in forward order (``blocks.{L}.hook_resid_pre`` before
``blocks.{L}.hook_resid_post``, layer by layer), so edits compose in layer order. The first
editor of a forward resets the condition board.

    editors = point_editors(tables, vector_tables, board, window)
    with edit_hooks(model, editors):
        model(...)
"""

from __future__ import annotations

import contextlib

import torch

from editing.edits import hook_rank
from editing.nethook import Trace


class PointEditor:
    def __init__(self, hook: str, tables: list, vectors, board, first: bool):
        self.hook, self.tables, self.vectors, self.board, self.first = hook, tables, vectors, board, first

    def __call__(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        """``edit_output`` for the hook layer: ``hidden (R, T, d)`` of the window → edited ``hidden``."""
        if self.first:
            self.board.begin(hidden.shape[0], hidden.shape[1])
        incoming = hidden
        try:
            for table in self.tables:
                table.read_conditions(incoming)
            for table in self.tables:
                hidden = table.apply(hidden, incoming)
        finally:
            for table in self.tables:
                table.forget()
        if self.vectors is not None:
            hidden = self.vectors.apply(hidden)
        return hidden


def point_editors(tables, vector_tables, board, window) -> list[PointEditor]:
    """The editors of a forward over ``window``, in hook order; each table gets the window and board."""
    points: dict[str, list] = {}
    vectors = {table.hook: table for table in vector_tables}
    for table in sorted(tables, key=lambda t: (t.name, id(t.dictionary))):
        points.setdefault(table.hook, []).append(table)
    for table in [*tables, *vector_tables]:
        table.window, table.board = window, board
    hooks = sorted(set(points) | set(vectors), key=lambda hook: (hook_rank(hook), hook))
    return [PointEditor(hook, points.get(hook, []), vectors.get(hook), board, first=index == 0)
            for index, hook in enumerate(hooks)]


@contextlib.contextmanager
def edit_hooks(model, editors: list[PointEditor]):
    """Register every editor as its hook point's ``edit_output``, in order; always removed."""
    with contextlib.ExitStack() as stack:
        for editor in editors:
            stack.enter_context(Trace(model, editor.hook, retain_output=False, edit_output=editor))
        yield
