"""Per-head rank configs for the low-rank caches, in one JSON shape:

    {"global": {"target_memory_reduction": 0.5, "d_head": 64, "algo_default": "pca"},
     "per_layer_head": {"0/0": {"enabled": true, "rank": 32, "algo": "pca", "d_k": 64, "d_v": 64}, ...}}

A head entry gives one `rank` for keys and values, or `rank_k` and `rank_v` separately; a head
with `"enabled": false` stays exact (full rank). Heads the file leaves out take the global
`rank` (or `rank_k`/`rank_v`) when there is one. Every problem is reported with the field it is in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ALGORITHMS = ("pca", "kvsplice")


class ConfigError(ValueError):
    """An invalid compressor or rank config; the message names the field."""


@dataclass(frozen=True)
class HeadRanks:
    """Ranks of one KV head's keys and values (equal to the head dims when the head is not compressed)."""

    key: int
    value: int
    enabled: bool = True
    algo: str = "pca"


@dataclass
class RankConfig:
    """Ranks for every (layer, KV head) of one model."""

    num_layers: int
    num_kv_heads: int
    d_k: int
    d_v: int
    heads: dict[tuple[int, int], HeadRanks]
    algo_default: str = "pca"
    target_memory_reduction: float | None = None

    @classmethod
    def uniform(cls, num_layers: int, num_kv_heads: int, d_k: int, d_v: int, rank_k: int, rank_v: int | None = None, algo: str = "pca") -> RankConfig:
        rank_v = rank_k if rank_v is None else rank_v
        for name, rank, dim in (("rank_k", rank_k, d_k), ("rank_v", rank_v, d_v)):
            _check_rank(name, rank, dim)
        heads = {(layer, head): HeadRanks(rank_k, rank_v, True, algo) for layer in range(num_layers) for head in range(num_kv_heads)}
        return cls(num_layers, num_kv_heads, d_k, d_v, heads, algo)

    def memory_fraction(self) -> float:
        """Store size relative to dense keys and values: sum of ranks over sum of head dims."""
        held = sum(ranks.key + ranks.value for ranks in self.heads.values())
        return held / (len(self.heads) * (self.d_k + self.d_v))

    def layer_ranks(self, layer: int) -> tuple[list[int], list[int]]:
        """(key ranks, value ranks) of the layer's heads."""
        heads = [self.heads[layer, head] for head in range(self.num_kv_heads)]
        return [ranks.key for ranks in heads], [ranks.value for ranks in heads]

    def to_json(self) -> dict:
        glob = {"d_head": self.d_k, "d_k": self.d_k, "d_v": self.d_v, "algo_default": self.algo_default}
        if self.target_memory_reduction is not None:
            glob["target_memory_reduction"] = self.target_memory_reduction
        per_head = {}
        for (layer, head), ranks in sorted(self.heads.items()):
            entry = {"enabled": ranks.enabled, "algo": ranks.algo, "d_k": self.d_k, "d_v": self.d_v}
            if ranks.enabled:
                entry |= {"rank": ranks.key} if ranks.key == ranks.value else {"rank_k": ranks.key, "rank_v": ranks.value}
            per_head[f"{layer}/{head}"] = entry
        return {"global": glob, "per_layer_head": per_head}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, num_layers: int, num_kv_heads: int, d_k: int, d_v: int) -> RankConfig:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"Rank config {path} does not exist.") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"Rank config {path} is not valid JSON: {error}") from None
        return cls.from_json(data, num_layers, num_kv_heads, d_k, d_v)

    @classmethod
    def from_json(cls, data, num_layers: int, num_kv_heads: int, d_k: int, d_v: int) -> RankConfig:
        """Validate a rank config against a model's layer, head and head-dim counts."""
        if not isinstance(data, dict):
            raise ConfigError("The rank config must be a JSON object with 'global' and 'per_layer_head'.")
        unknown = set(data) - {"global", "per_layer_head"}
        if unknown:
            raise ConfigError(f"Unknown top-level field(s) {sorted(unknown)}; expected 'global' and 'per_layer_head'.")
        glob = _object(data.get("global", {}), "global")
        per_head = _object(data.get("per_layer_head", {}), "per_layer_head")
        for name, expected in (("d_head", d_k), ("d_k", d_k), ("d_v", d_v)):
            if name in glob and glob[name] != expected:
                raise ConfigError(f"global.{name} is {glob[name]!r} but the model's heads have {expected} dims.")
        algo_default = glob.get("algo_default", "pca")
        if algo_default not in ALGORITHMS:
            raise ConfigError(f"global.algo_default is {algo_default!r}; choose from {', '.join(ALGORITHMS)}.")
        target = glob.get("target_memory_reduction")
        if target is not None and not (isinstance(target, (int, float)) and 0 <= target < 1):
            raise ConfigError(f"global.target_memory_reduction must be a fraction in [0, 1), got {target!r}.")
        heads = {}
        for key, entry in per_head.items():
            layer, head = _head_key(key, num_layers, num_kv_heads)
            heads[layer, head] = _head_ranks(_object(entry, f"per_layer_head['{key}']"), f"per_layer_head['{key}']", d_k, d_v, algo_default)
        missing = [(layer, head) for layer in range(num_layers) for head in range(num_kv_heads) if (layer, head) not in heads]
        if missing:
            if not {"rank", "rank_k", "rank_v"} & set(glob):
                raise ConfigError(
                    f"per_layer_head has no entry for {len(missing)} head(s) (first: '{missing[0][0]}/{missing[0][1]}') and global "
                    "gives no default 'rank'. List every 'layer/head' or set global.rank."
                )
            default = _head_ranks({"enabled": True, **{k: glob[k] for k in ("rank", "rank_k", "rank_v") if k in glob}}, "global", d_k, d_v, algo_default)
            heads |= {position: default for position in missing}
        return cls(num_layers, num_kv_heads, d_k, d_v, heads, algo_default, target)


def _object(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{field} must be a JSON object, got {type(value).__name__}.")
    return value


def _check_rank(field: str, rank, dim: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= dim:
        raise ConfigError(f"{field} must be an integer from 1 to {dim} (the head dim), got {rank!r}.")


def _head_key(key: str, num_layers: int, num_kv_heads: int) -> tuple[int, int]:
    layer, _, head = key.partition("/")
    if not (layer.isdigit() and head.isdigit()):
        raise ConfigError(f"per_layer_head key {key!r} must look like 'layer/head', e.g. '0/1'.")
    if int(layer) >= num_layers or int(head) >= num_kv_heads:
        raise ConfigError(f"per_layer_head['{key}'] is outside the model: it has {num_layers} layers and {num_kv_heads} KV heads.")
    return int(layer), int(head)


def _head_ranks(entry: dict, field: str, d_k: int, d_v: int, algo_default: str) -> HeadRanks:
    known = {"enabled", "rank", "rank_k", "rank_v", "algo", "d_k", "d_v"}
    unknown = set(entry) - known
    if unknown:
        raise ConfigError(f"{field} has unknown field(s) {sorted(unknown)}; known: {sorted(known)}.")
    for name, expected in (("d_k", d_k), ("d_v", d_v)):
        if name in entry and entry[name] != expected:
            raise ConfigError(f"{field}.{name} is {entry[name]!r} but the model's heads have {expected} dims.")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{field}.enabled must be true or false, got {enabled!r}.")
    algo = entry.get("algo", algo_default)
    if algo not in ALGORITHMS:
        raise ConfigError(f"{field}.algo is {algo!r}; choose from {', '.join(ALGORITHMS)}.")
    if not enabled:
        return HeadRanks(d_k, d_v, False, algo)
    if "rank" in entry and ("rank_k" in entry or "rank_v" in entry):
        raise ConfigError(f"{field} gives both 'rank' and 'rank_k'/'rank_v'; give one or the other.")
    rank_k, rank_v = entry.get("rank_k", entry.get("rank")), entry.get("rank_v", entry.get("rank"))
    if rank_k is None or rank_v is None:
        raise ConfigError(f"{field} is enabled but has no 'rank' (or 'rank_k' and 'rank_v').")
    _check_rank(f"{field}.rank_k" if "rank_k" in entry else f"{field}.rank", rank_k, d_k)
    _check_rank(f"{field}.rank_v" if "rank_v" in entry else f"{field}.rank", rank_v, d_v)
    return HeadRanks(rank_k, rank_v, True, algo)
