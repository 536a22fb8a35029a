"""Edit specs, validated against the loaded dictionaries.

    {"dictionary": "l2-relu", "feature": 312, "op": "ablate"}
    {"dictionary": "l2-relu", "feature": 77,  "op": "scale", "value": 4.0, "positions": "generated"}

With ``f`` the encoded features of the residual ``h`` at the dictionary's hook point:

    ablate   f'ᵢ = 0          scale   f'ᵢ = v·fᵢ
    set      f'ᵢ = v          add     f'ᵢ = fᵢ + v

and the hook writes ``h' = h + Σᵢ (f'ᵢ − fᵢ)·W_dec[i]`` (times the dictionary's output
normalisation scale), keeping the reconstruction error. ``positions`` picks the tokens
whose residual is edited: ``prompt`` tokens, ``generated`` tokens (each generated token
once it is fed back in), or ``all``. Every op is the affine map ``f' = a·f + b``, which is
how the engine stores edits as per-row tensors.

:class:`EditSpec` is a pydantic model so the HTTP API can use it as it is.
"""

from __future__ import annotations

from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_ABS_VALUE = 1e6


class EditError(ValueError):
    """An edit the caller got wrong; ``param`` names the field (``edits[2].feature``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EditSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dictionary: str = Field(min_length=1, max_length=64, description="Name of a loaded dictionary.")
    feature: int = Field(ge=0, description="Feature index in [0, d_sae).")
    op: Literal["ablate", "scale", "set", "add"] = Field(description="ablate: 0; scale: v·f; set: v; add: f + v.")
    value: float | None = Field(default=None, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE, allow_inf_nan=False,
                                description="Required for scale, set and add; absent for ablate.")
    positions: Literal["all", "prompt", "generated"] = Field(default="all", description="Which tokens are edited.")

    @model_validator(mode="after")
    def _value_matches_op(self) -> "EditSpec":
        if self.op == "ablate" and self.value is not None:
            raise ValueError("'value' must be omitted for op 'ablate'")
        if self.op != "ablate" and self.value is None:
            raise ValueError(f"'value' is required for op {self.op!r}")
        return self

    def affine(self) -> tuple[float, float]:
        """``(a, b)`` with ``f' = a·f + b``."""
        return {"ablate": (0.0, 0.0), "scale": (self.value, 0.0), "set": (0.0, self.value),
                "add": (1.0, self.value)}[self.op]

    def label(self) -> str:
        value = "" if self.value is None else f":{self.value:g}"
        return f"{self.dictionary}:{self.feature}:{self.op}{value}"


def parse_edit(text: str) -> EditSpec:
    """``DICT:FEATURE:OP[:VALUE][@POSITIONS]`` → :class:`EditSpec` (the CLI's form)."""
    text, _, positions = text.partition("@")
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise EditError(f"edit {text!r}: expected DICT:FEATURE:OP[:VALUE][@all|prompt|generated]", "edit")
    try:
        feature = int(parts[1])
        value = float(parts[3]) if len(parts) == 4 else None
    except ValueError:
        raise EditError(f"edit {text!r}: FEATURE must be an integer and VALUE a number", "edit") from None
    try:
        return EditSpec(dictionary=parts[0], feature=feature, op=parts[2], value=value, positions=positions or "all")
    except ValueError as err:
        raise EditError(f"edit {text!r}: {err}", "edit") from None


def validate_edits(edits, dictionaries: Mapping[str, object], param: str = "edits") -> list[EditSpec]:
    """Check each edit against the loaded dictionaries (anything with ``.config.d_sae``)."""
    checked = []
    for index, edit in enumerate(edits):
        where = f"{param}[{index}]"
        if not isinstance(edit, EditSpec):
            try:
                edit = EditSpec.model_validate(edit)
            except ValueError as err:
                raise EditError(f"{where}: {err}", where) from None
        if edit.dictionary not in dictionaries:
            known = ", ".join(sorted(dictionaries)) or "none are loaded"
            raise EditError(f"{where}.dictionary: unknown dictionary {edit.dictionary!r} (loaded: {known})",
                            f"{where}.dictionary")
        d_sae = dictionaries[edit.dictionary].config.d_sae
        if edit.feature >= d_sae:
            raise EditError(f"{where}.feature: feature {edit.feature} is out of range for "
                            f"{edit.dictionary!r}, which has {d_sae} features (0..{d_sae - 1})", f"{where}.feature")
        checked.append(edit)
    return checked
