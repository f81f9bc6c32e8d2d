"""The schema of `compressor_config.json`: every field typed, bounded, and required or optional.

An artifact is untrusted input (a download, a file someone edited), so its config is checked field by field before
anything is built from it, and every refusal names the field, what it holds and what is allowed. Sizes are bounded
so that a config declaring a huge model cannot make loading allocate or loop without end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .config import ConfigError

# Sizes far beyond any model and far below what would exhaust memory or time while an artifact is read.
MAX_LAYERS = MAX_HEADS = 1024
MAX_SIZE = 2**16  # head dims, widths, windows


@dataclass(frozen=True)
class Field:
    """One config field: its JSON type, whether it must be there, and its allowed range or nested fields.

    `kind`: int, float (any JSON number), str, bool, list or dict. `fields`: a dict's own schema (None: free-form, such as
    calibration records). `items`: the kind of a list's items."""

    kind: type
    required: bool = True
    nullable: bool = False
    low: float | None = None
    high: float | None = None
    fields: dict[str, Field] | None = None
    items: type | None = None

    def check(self, value, where: str) -> None:
        if value is None and self.nullable:
            return
        if not _is(value, self.kind) or (self.kind in (int, float) and not (-math.inf if self.low is None else self.low) <= value <= (math.inf if self.high is None else self.high)):
            raise ConfigError(f"{PREFIX}{where} is {_short(value)}; it must be {self._what()}.")
        if self.items is not None:
            for index, item in enumerate(value):
                if not _is(item, self.items):
                    raise ConfigError(f"{PREFIX}{where}[{index}] is {_short(item)}; it must be {_names[self.items]}.")
        if self.fields is not None:
            check(value, self.fields, where)

    def _what(self) -> str:
        what = _names[self.kind] + (f" of {_names[self.items]}s" if self.items else "")
        if self.low is not None and self.high is not None:
            what += f" from {self.low:g} to {self.high:g}"
        elif self.low is not None:
            what += f" >= {self.low:g}"
        return what + (" or null" if self.nullable else "")


PREFIX = "compressor_config.json: "
_names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", list: "a list", dict: "a JSON object"}


def _short(value) -> str:
    text = json.dumps(value, default=repr) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check(config, schema: dict[str, Field], where: str = "") -> None:
    """Raise `ConfigError` unless `config` (the object at `where`) has every required field of `schema`, each of its kind and
    range, and no field the schema does not know (a misspelt field would otherwise be silently ignored)."""
    inside = f" in {where}" if where else ""
    if not isinstance(config, dict):
        raise ConfigError(f"{PREFIX}{where or 'the file'} must be a JSON object, got {_short(config)}.")
    unknown = sorted(set(config) - set(schema))
    if unknown:
        raise ConfigError(f"{PREFIX}unknown field(s) {unknown}{inside}; known: {sorted(schema)}.")
    for name, field in schema.items():
        if name in config:
            field.check(config[name], f"{where}.{name}" if where else name)
        elif field.required:
            raise ConfigError(f"{PREFIX}the field {name!r}{inside} is missing ({field._what()}); re-save or re-calibrate the compressor.")


def size(low: int = 1, required: bool = True, high: int = MAX_SIZE) -> Field:
    """A bounded count: layers, heads, dims, widths."""
    return Field(int, required=required, low=low, high=high)


FINGERPRINT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")  # each attention projection's weight norm, per layer

BASE_MODEL = {
    "name_or_path": Field(str),
    "revision": Field(str, required=False, nullable=True),
    "model_type": Field(str),
    "num_layers": size(high=MAX_LAYERS),
    "num_attention_heads": size(high=MAX_HEADS),
    "num_kv_heads": size(high=MAX_HEADS),
    "head_dim": size(2),
    "head_dim_v": size(required=False),
    "fingerprint": Field(dict, fields={name: Field(list, items=float) for name in FINGERPRINT_NAMES}),
}

ARTIFACT = {
    "method": Field(str),
    "base_model": Field(dict, fields=BASE_MODEL),
    "cache": Field(dict, required=False, fields={"sink": size(0, False), "window": size(0, False), "block_size": size(1, False)}),
    "calibration": Field(dict, required=False),  # free-form records of how the artifact was made
    "metrics": Field(dict, required=False),
}
