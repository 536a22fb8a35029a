"""Edit specs, validated against the loaded dictionaries and steering vectors.

    {"dictionary": "l2-relu", "feature": 312, "op": "ablate"}
    {"dictionary": "l2-relu", "feature": 77,  "op": "scale", "value": 4.0, "positions": "generated"}
    {"dictionary": "l2-relu", "feature": 77,  "op": "set", "value": 2, "value_unit": "max_activation",
     "when": {"dictionary": "l2-relu", "feature": 12, "above": 0.5}}
    {"op": "vector", "vector": "cat-vs-dog", "value": 4.0}
    {"op": "vector", "vector": "cat-vs-dog", "value": 0.3, "value_unit": "residual_norm"}

With ``f`` the encoded features of the residual ``h`` at the dictionary's hook point:

    ablate   f'ᵢ = 0          scale   f'ᵢ = v·fᵢ
    set      f'ᵢ = v          add     f'ᵢ = fᵢ + v

and the hook writes ``h' = h + Σᵢ (f'ᵢ − fᵢ)·W_dec[i]`` (times the dictionary's output
normalisation scale), keeping the reconstruction error. ``positions`` picks the tokens
whose residual is edited: ``prompt`` tokens, ``generated`` tokens (each generated token
once it is fed back in), or ``all``. Every feature op is the affine map ``f' = a·f + b``,
which is how the engine stores edits as per-row tensors.

- ``vector`` adds ``value·v`` to the residual at the stored vector's hook point (``v`` a
  steering vector from the store); with ``value_unit: "residual_norm"`` it adds
  ``value·‖h‖·v/‖v‖``, a fraction of the residual's own norm at each position.
- ``value_unit: "max_activation"`` (``set`` and ``add``) reads ``value`` in multiples of the
  feature's recorded maximum activation (its statistics), resolved when the row is admitted.
- ``when`` makes an edit conditional: it applies only at the tokens where a feature of a
  dictionary at the same hook point or an earlier one is above (or below) a threshold. The
  condition reads the feature as it arrives at its hook point, before any edit there.

:class:`EditSpec` is a pydantic model so the HTTP API can use it as it is.
"""

from __future__ import annotations

from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dictionaries.config import HOOK_NAME

MAX_ABS_VALUE = 1e6
FEATURE_OPS = ("ablate", "scale", "set", "add")
UNIT_ALIASES = {"raw": "raw", "max": "max_activation", "max_activation": "max_activation",
                "norm": "residual_norm", "residual_norm": "residual_norm"}


class EditError(ValueError):
    """An edit the caller got wrong; ``param`` names the field (``edits[2].feature``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Condition(BaseModel):
    """``when``: a feature above or below a threshold, at each token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dictionary: str = Field(min_length=1, max_length=64, description="A loaded dictionary at the edit's hook point "
                                                                      "or an earlier one.")
    feature: int = Field(ge=0, description="Feature index in [0, d_sae).")
    above: float | None = Field(default=None, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE, allow_inf_nan=False,
                                description="Holds where the activation is > above.")
    below: float | None = Field(default=None, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE, allow_inf_nan=False,
                                description="Holds where the activation is < below.")

    @model_validator(mode="after")
    def _one_threshold(self) -> "Condition":
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of 'above' and 'below'")
        return self

    @property
    def threshold(self) -> float:
        return self.above if self.above is not None else self.below

    def label(self) -> str:
        return f"{self.dictionary}:{self.feature}{'>' if self.above is not None else '<'}{self.threshold:g}"


class EditSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dictionary: str | None = Field(default=None, min_length=1, max_length=64,
                                   description="Name of a loaded dictionary (feature ops).")
    feature: int | None = Field(default=None, ge=0, description="Feature index in [0, d_sae) (feature ops).")
    op: Literal["ablate", "scale", "set", "add", "vector"] = Field(
        description="ablate: 0; scale: v·f; set: v; add: f + v; vector: h + v·(steering vector).")
    value: float | None = Field(default=None, ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE, allow_inf_nan=False,
                                description="Required for scale, set, add and vector; absent for ablate.")
    positions: Literal["all", "prompt", "generated"] = Field(default="all", description="Which tokens are edited.")
    value_unit: Literal["raw", "max_activation", "residual_norm"] = Field(
        default="raw", description="raw; max_activation (set/add: multiples of the feature's recorded maximum "
                                   "activation); residual_norm (vector: value·‖h‖·v/‖v‖ at each position).")
    vector: str | None = Field(default=None, min_length=1, max_length=64,
                               description="Name of a stored steering vector (op vector).")
    when: Condition | None = Field(default=None, description="Apply only at tokens where this condition holds.")

    @model_validator(mode="after")
    def _fields_match_op(self) -> "EditSpec":
        if self.op == "ablate" and self.value is not None:
            raise ValueError("'value' must be omitted for op 'ablate'")
        if self.op != "ablate" and self.value is None:
            raise ValueError(f"'value' is required for op {self.op!r}")
        if self.op == "vector":
            if self.vector is None:
                raise ValueError("'vector' (the name of a stored steering vector) is required for op 'vector'")
            if self.dictionary is not None or self.feature is not None:
                raise ValueError("op 'vector' takes 'vector', not 'dictionary' and 'feature'")
            if self.value_unit == "max_activation":
                raise ValueError("value_unit 'max_activation' applies to set and add; a vector takes raw or residual_norm")
            return self
        if self.dictionary is None or self.feature is None:
            raise ValueError(f"op {self.op!r} needs 'dictionary' and 'feature'")
        if self.vector is not None:
            raise ValueError(f"'vector' is only for op 'vector', not {self.op!r}")
        if self.value_unit == "residual_norm":
            raise ValueError("value_unit 'residual_norm' applies to op 'vector'")
        if self.value_unit == "max_activation" and self.op not in ("set", "add"):
            raise ValueError(f"value_unit 'max_activation' applies to set and add, not {self.op!r}")
        return self

    def affine(self, value: float | None = None) -> tuple[float, float]:
        """``(a, b)`` with ``f' = a·f + b``; ``value`` overrides the spec's (a unit resolved to raw)."""
        v = self.value if value is None else value
        return {"ablate": (0.0, 0.0), "scale": (v, 0.0), "set": (0.0, v), "add": (1.0, v)}[self.op]

    def label(self) -> str:
        unit = {"raw": "", "max_activation": "xmax", "residual_norm": "xnorm"}[self.value_unit]
        value = "" if self.value is None else f":{self.value:g}{unit}"
        when = f" when {self.when.label()}" if self.when is not None else ""
        if self.op == "vector":
            return f"vector:{self.vector}{value}{when}"
        return f"{self.dictionary}:{self.feature}:{self.op}{value}{when}"


def hook_rank(hook: str) -> tuple[int, int]:
    """Where a hook point runs in the forward pass: ``blocks.{L}.hook_resid_pre`` before
    ``blocks.{L}.hook_resid_post``, layer by layer (no torch needed, so the CLI stays light)."""
    match = HOOK_NAME.match(hook)
    if not match:
        raise EditError(f"hook point {hook!r}: expected 'blocks.<layer>.hook_resid_post|pre'", "hook")
    return int(match.group(1)), 0 if match.group(2) == "resid_pre" else 1


def dictionaries_named(edits) -> set[str]:
    """Every dictionary the edits use: edited, or read by a condition."""
    names = set()
    for edit in edits:
        if edit.dictionary is not None:
            names.add(edit.dictionary)
        if edit.when is not None:
            names.add(edit.when.dictionary)
    return names


def vectors_named(edits) -> set[str]:
    return {edit.vector for edit in edits if edit.vector is not None}


def _parse_condition(text: str, where: str) -> Condition:
    """``DICT:FEATURE>TAU`` or ``DICT:FEATURE<TAU``."""
    for sign, field in ((">", "above"), ("<", "below")):
        if sign in text:
            head, _, threshold = text.partition(sign)
            dictionary, _, feature = head.rpartition(":")
            try:
                return Condition(dictionary=dictionary, feature=int(feature), **{field: float(threshold)})
            except ValueError as err:
                raise EditError(f"{where}: condition {text!r}: {err}", "edit") from None
    raise EditError(f"{where}: condition {text!r}: expected DICT:FEATURE>THRESHOLD or DICT:FEATURE<THRESHOLD", "edit")


def parse_edit(text: str) -> EditSpec:
    """The CLI's form → :class:`EditSpec`:

        DICT:FEATURE:OP[:VALUE][@POSITIONS][,unit=max][,when=DICT:FEATURE>TAU]
        vector:NAME:VALUE[@POSITIONS][,unit=norm][,when=DICT:FEATURE<TAU]
    """
    head, *options = text.split(",")
    head, _, positions = head.partition("@")
    fields: dict = {"positions": positions or "all"}
    for option in options:
        key, _, value = option.partition("=")
        if key == "unit" and value in UNIT_ALIASES:
            fields["value_unit"] = UNIT_ALIASES[value]
        elif key == "when" and value:
            fields["when"] = _parse_condition(value, f"edit {text!r}")
        else:
            raise EditError(f"edit {text!r}: unknown option {option!r}; use unit=raw|max|norm or "
                            "when=DICT:FEATURE>THRESHOLD", "edit")
    parts = head.split(":")
    try:
        if len(parts) == 3 and parts[0] == "vector" and _is_number(parts[2]):
            return EditSpec(op="vector", vector=parts[1], value=float(parts[2]), **fields)
        if len(parts) not in (3, 4):
            raise EditError(f"edit {text!r}: expected DICT:FEATURE:OP[:VALUE][@all|prompt|generated] or "
                            "vector:NAME:VALUE", "edit")
        if not parts[1].isdigit() or (len(parts) == 4 and not _is_number(parts[3])):
            raise EditError(f"edit {text!r}: FEATURE must be an integer and VALUE a number", "edit")
        value = float(parts[3]) if len(parts) == 4 else None
        return EditSpec(dictionary=parts[0], feature=int(parts[1]), op=parts[2], value=value, **fields)
    except EditError:
        raise
    except ValueError as err:
        raise EditError(f"edit {text!r}: {err}", "edit") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def validate_edits(edits, dictionaries: Mapping[str, object], param: str = "edits", *,
                   vectors: Mapping[str, object] | None = None,
                   feature_max: Mapping[str, object] | None = None) -> list[EditSpec]:
    """Check each edit against the loaded dictionaries (anything with ``.config.d_sae`` and
    ``.config.hook``) and steering vectors (anything with ``.hook``); ``feature_max`` holds each
    dictionary's recorded maximum activations (absent: it has no statistics)."""
    vectors = vectors or {}
    feature_max = feature_max or {}
    checked = []
    for index, edit in enumerate(edits):
        where = f"{param}[{index}]"
        if not isinstance(edit, EditSpec):
            try:
                edit = EditSpec.model_validate(edit)
            except ValueError as err:
                raise EditError(f"{where}: {err}", where) from None
        if edit.op == "vector":
            if edit.vector not in vectors:
                known = ", ".join(sorted(vectors)) or "none are stored"
                raise EditError(f"{where}.vector: unknown steering vector {edit.vector!r} (have: {known})",
                                f"{where}.vector")
            hook = vectors[edit.vector].hook
        else:
            _check_feature(edit.dictionary, edit.feature, dictionaries, f"{where}.dictionary", f"{where}.feature")
            hook = dictionaries[edit.dictionary].config.hook
            if edit.value_unit == "max_activation":
                _check_max_activation(edit, feature_max.get(edit.dictionary), where)
        if edit.when is not None:
            condition = edit.when
            _check_feature(condition.dictionary, condition.feature, dictionaries, f"{where}.when.dictionary",
                           f"{where}.when.feature")
            condition_hook = dictionaries[condition.dictionary].config.hook
            if hook_rank(condition_hook) > hook_rank(hook):
                raise EditError(f"{where}.when.dictionary: the condition reads {condition.dictionary!r} at "
                                f"{condition_hook}, which comes after the edit's hook point {hook}; a condition "
                                "must be read at the same hook point or an earlier one", f"{where}.when.dictionary")
        checked.append(edit)
    return checked


def _check_feature(name, feature, dictionaries, dictionary_param: str, feature_param: str) -> None:
    if name not in dictionaries:
        known = ", ".join(sorted(dictionaries)) or "none are loaded"
        raise EditError(f"{dictionary_param}: unknown dictionary {name!r} (loaded: {known})", dictionary_param)
    d_sae = dictionaries[name].config.d_sae
    if feature >= d_sae:
        raise EditError(f"{feature_param}: feature {feature} is out of range for {name!r}, which has {d_sae} "
                        f"features (0..{d_sae - 1})", feature_param)


def _check_max_activation(edit: EditSpec, maxima, where: str) -> None:
    if maxima is None:
        raise EditError(f"{where}.value_unit: 'max_activation' needs the feature statistics of {edit.dictionary!r} "
                        "(features.safetensors), and this dictionary has none; use value_unit 'raw'",
                        f"{where}.value_unit")
    if not float(maxima[edit.feature]) > 0:
        raise EditError(f"{where}.value_unit: feature {edit.feature} of {edit.dictionary!r} never fired in its "
                        "statistics' windows, so it has no recorded maximum activation; use value_unit 'raw'",
                        f"{where}.value_unit")
