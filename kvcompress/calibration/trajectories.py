"""Trajectories for the sidecar (seeds 000-002): what the frozen model's attention sees, and the forces on it.

Per calibration sequence of `sequence_length` tokens, one shard (a safetensors file) holds, for every
layer:

* ``keys``/``values [L, kv_heads, T, D]``: every token's post-RoPE key and value (the windows to merge
  *and* the context they compete with in the softmax);
* ``queries [L, heads, P, D]``: the post-RoPE queries of `query_positions` sampled positions (the
  future queries a merged window must serve), for every query head;
* ``forces [L, heads, P, D]``: dL/dq, the gradient of the sequence's summed next-token loss with
  respect to those queries (backpropagation through the frozen model), the seed-000 force;
* ``output_grads [L, heads, P, D]``: dL/dy, the gradient with respect to the same heads' attention
  outputs. A query only acts through its own attention, so ``forces = J^T output_grads`` with J the
  attention Jacobian dy/dq: training can ask a merged window for the same force, ``J_merged^T dL/dy``.

Both gradients come from zero probes added to the queries and to the attention outputs inside a
registered attention implementation, so nothing model-specific is redone. Collection is resumable
(finished shards are kept; a directory collected with other settings, or from another model's weights, is
refused) and bounded by a disk budget checked before it starts. Training reads the shards one (sequence, layer) at a time, so
memory holds a layer of a sequence, not the collection (about 30 GB for a 70B model's 28 sequences).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kvcompress.hub import model_signature, same_base_model
from kvcompress.models import cache_dir, kv_shape

from .collect import attention_tap

MANIFEST = "trajectories.json"
STORED_DTYPES = {"keys": torch.float16, "values": torch.float16, "queries": torch.float16, "forces": torch.float32, "output_grads": torch.float32}


def _query_output_probes(layers: dict, layer: int, query, key, value, attend):
    """Zero probes on the queries and the attention output: their gradients are the forces and output gradients stored."""
    query_probe = torch.zeros_like(query, requires_grad=True)
    output, weights = attend(query + query_probe, key, value)
    output_probe = torch.zeros_like(output, requires_grad=True)  # [B, T, heads, D]
    layers[layer] = (query.detach(), key.detach(), value.detach(), query_probe, output_probe)
    return output + output_probe, weights


@dataclass
class Trajectories:
    """Collected shards, read from disk one (sequence, layer) at a time: `layer(sequence, layer)` gives keys/values
    ``[kv_heads, T, D]``, queries/forces/output_grads ``[heads, P, D]`` (as stored) and positions ``[P]`` (each query's
    place in its sequence); `queries(sequence)` all layers' queries ``[L, heads, P, D]`` with their positions."""

    shards: list[Path]
    settings: dict

    @property
    def sequences(self) -> int:
        return len(self.shards)

    @property
    def num_layers(self) -> int:
        return self.settings["num_layers"]

    @property
    def num_heads(self) -> int:
        """KV heads per layer."""
        return self.settings["kv_heads"]

    def layer(self, sequence: int, layer: int, names: tuple[str, ...] = tuple(STORED_DTYPES)) -> dict[str, torch.Tensor]:
        """The `names` tensors (default: all) of one layer of one sequence, and the query positions."""
        with safe_open(str(self.shards[sequence]), framework="pt") as shard:
            return {name: shard.get_slice(name)[layer] for name in names} | {"positions": shard.get_tensor("positions")}

    def queries(self, sequence: int) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(str(self.shards[sequence]), framework="pt") as shard:
            return shard.get_tensor("queries"), shard.get_tensor("positions")

    def split(self, heldout: int) -> tuple[Trajectories, Trajectories]:
        """(first sequences, last `heldout` sequences)."""
        if not 0 < heldout < self.sequences:
            raise ValueError(f"Cannot hold out {heldout} of {self.sequences} trajectory sequences; collect more sequences.")
        return Trajectories(self.shards[:-heldout], self.settings), Trajectories(self.shards[-heldout:], self.settings)


def shard_bytes(num_layers: int, kv_heads: int, heads: int, head_dim: int, sequence_length: int, query_positions: int) -> int:
    """Bytes one sequence's shard takes on disk (tensor data)."""
    token_values = num_layers * kv_heads * sequence_length * head_dim * 2  # keys, values
    query_values = num_layers * heads * query_positions * head_dim
    return token_values * 2 + query_values * (2 + 4 + 4) + query_positions * 8


def _sample_positions(sequence_length: int, count: int, first: int, generator: torch.Generator) -> torch.Tensor:
    candidates = torch.arange(first, sequence_length)
    if count > len(candidates):
        raise ValueError(f"query_positions ({count}) exceeds the {len(candidates)} positions from {first} to the end of a sequence.")
    return candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values


def trajectory_settings(
    model, token_ids: torch.Tensor, sequence_length: int = 1024, query_positions: int = 128, first_query: int = 64, seed: int = 0,
    source: str | None = None,
) -> dict:
    """What a trajectory directory's manifest records and a resumed collection must match: the model (its signature), the
    text (a digest of its first sequence's tokens), the sampling settings and the `source` of the stream (e.g. recall sequences)."""
    num_layers, kv_heads, head_dim = kv_shape(model.config)
    text = hashlib.sha256(token_ids[:sequence_length].to("cpu", torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {
        "base_model": model_signature(model), "sequence_length": sequence_length, "query_positions": query_positions,
        "first_query": first_query, "seed": seed, "num_layers": num_layers, "kv_heads": kv_heads, "heads": model.config.num_attention_heads,
        "head_dim": head_dim, "text": text, "loss": "sum of next-token cross-entropy over the sequence",
    } | ({"source": source} if source else {})


def default_directory(settings: dict, root: Path) -> Path:
    """Where trajectories of `settings` (`trajectory_settings`) go under `root` unless asked otherwise: named by the model's
    type and a digest of all else but the model's name and path (its weights' fingerprint to 3 digits, the text, the
    sampling), so that another model, text or setting collects its own and a copy of the same model anywhere resumes them."""
    signature = settings["base_model"]
    identity = {name: value for name, value in settings.items() if name != "base_model"}
    identity["base_model"] = {name: value for name, value in signature.items() if name not in ("name_or_path", "revision")}
    identity["base_model"]["fingerprint"] = {name: [f"{norm:.3g}" for norm in norms] for name, norms in signature["fingerprint"].items()}
    return root / f"{signature['model_type']}-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}"


@torch.enable_grad()
def collect_trajectories(
    model,
    token_ids: torch.Tensor,
    output_dir: str | Path | None = None,
    sequences: int = 24,
    sequence_length: int = 1024,
    query_positions: int = 128,
    first_query: int = 64,
    disk_budget_gb: float = 4.0,
    seed: int = 0,
    source: str | None = None,
) -> Trajectories:
    """Run the frozen `model` over `sequences` sequences of the 1-D `token_ids` stream, writing one shard per
    sequence to `output_dir` (by default `default_directory` under kvcompress's cache; finished shards of an earlier run with
    the same settings are kept), and load them. `source` names what the stream is beyond its text (e.g. recall sequences),
    so that shards of another are not resumed."""
    settings = trajectory_settings(model, token_ids, sequence_length, query_positions, first_query, seed, source)
    output_dir = default_directory(settings, cache_dir() / "trajectories") if output_dir is None else Path(output_dir)
    needed = sequences * sequence_length
    if sequences < 1 or len(token_ids) < needed:
        raise ValueError(
            f"Too little calibration data for trajectories: {sequences} sequences of {sequence_length} tokens need {needed} tokens, "
            f"the text has {len(token_ids)}. Give more text or ask for fewer sequences (on the command line: --trajectory-sequences "
            "and --heldout-sequences)."
        )
    per_shard = shard_bytes(settings["num_layers"], settings["kv_heads"], settings["heads"], settings["head_dim"], sequence_length, query_positions)
    if sequences * per_shard > disk_budget_gb * 1e9:
        fits = int(disk_budget_gb * 1e9 // per_shard)
        raise ValueError(
            f"{sequences} trajectory sequences take {sequences * per_shard / 1e9:.2f} GB, over the disk budget of {disk_budget_gb:g} GB "
            f"({fits} fit). Raise the budget, or collect fewer sequences or query positions."
        )
    _check_manifest(output_dir, settings)
    generator = torch.Generator().manual_seed(seed)
    positions = [_sample_positions(sequence_length, query_positions, first_query, generator) for _ in range(sequences)]
    shards = [output_dir / f"sequence-{index:05d}.safetensors" for index in range(sequences)]
    missing = [index for index, shard in enumerate(shards) if not _shard_complete(shard)]
    tqdm.write(f"trajectories go to {output_dir}/ (finished sequences are kept for a rerun; delete the folder when you are done)", file=sys.stderr)
    if len(missing) < sequences:
        tqdm.write(f"{sequences - len(missing)} of the {sequences} sequences' trajectories are in {output_dir} from an earlier run: kept", file=sys.stderr)
    with attention_tap(model, _query_output_probes, probing=True) as probes:
        for index in tqdm(missing, desc="trajectories", unit="seq"):
            chunk = token_ids[index * sequence_length : (index + 1) * sequence_length][None].to(model.device)
            logits = model(input_ids=chunk, use_cache=False).logits[0]
            torch.nn.functional.cross_entropy(logits[:-1].float(), chunk[0, 1:].to(logits.device), reduction="sum").backward()
            _write_shard(shards[index], [probes[layer] for layer in sorted(probes)], positions[index])
            probes.clear()
    return load_trajectories(output_dir, sequences)


def _check_manifest(output_dir: Path, settings: dict) -> None:
    manifest = output_dir / MANIFEST
    if manifest.is_file():
        existing = json.loads(manifest.read_text())
        different = sorted(
            name for name in settings.keys() | existing.keys() if name != "base_model" and existing.get(name) != settings.get(name)
        )
        if different or "base_model" not in existing:
            raise ValueError(
                f"{output_dir} holds trajectories collected with other settings ({', '.join(different or ['base_model'])} differ); "
                "use another directory or delete it to collect afresh."
            )
        if not same_base_model(existing["base_model"], settings["base_model"]):
            raise ValueError(
                f"{output_dir} holds trajectories of another model ({existing['base_model']['name_or_path']}: its type, shapes or "
                f"weights differ from {settings['base_model']['name_or_path']}'s); use another directory or delete it to collect afresh."
            )
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(settings, indent=2) + "\n")


def _declared_shapes(shard: Path) -> dict[str, tuple]:
    """The tensors a shard's header declares, with their shapes; safetensors refuses a header that does not match the file's size."""
    with safe_open(str(shard), framework="pt") as opened:
        return {name: tuple(opened.get_slice(name).get_shape()) for name in opened.keys()}


def _shard_complete(shard: Path) -> bool:
    if not shard.is_file():
        return False
    try:
        _declared_shapes(shard)
    except (SafetensorError, OSError):
        return False  # a damaged shard (e.g. an interrupted copy) is collected again
    return True


def _write_shard(shard: Path, layers: list, positions: torch.Tensor) -> None:
    def gather(tensor):  # [1, heads, T, D] -> [heads, P, D]
        return tensor[0][:, positions.to(tensor.device)]

    per_layer = {
        "keys": [key[0] for _, key, _, _, _ in layers],
        "values": [value[0] for _, _, value, _, _ in layers],
        "queries": [gather(query) for query, *_ in layers],
        "forces": [gather(query_probe.grad) for *_, query_probe, _ in layers],
        "output_grads": [gather(output_probe.grad.transpose(1, 2)) for *_, output_probe in layers],
    }
    # each layer to the CPU first: a model spread over GPUs leaves each layer's tensors on its own device
    tensors = {name: torch.stack([tensor.to("cpu", STORED_DTYPES[name]) for tensor in tensors]) for name, tensors in per_layer.items()}
    tensors["positions"] = positions.to(torch.int64)
    partial = shard.with_suffix(".partial")
    save_file(tensors, str(partial))
    partial.replace(shard)  # a shard exists only once it is complete


def load_trajectories(directory: str | Path, sequences: int | None = None) -> Trajectories:
    """The (first `sequences`) shards of a trajectory directory, checked (names, shapes, sizes) but left on disk."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{directory} holds no trajectories ({MANIFEST} is missing); collect them with collect_trajectories.")
    shards = sorted(directory.glob("sequence-*.safetensors"))[:sequences]
    if not shards or (sequences is not None and len(shards) < sequences):
        raise FileNotFoundError(f"{directory} holds {len(shards)} trajectory shards, {sequences or 'at least 1'} needed; run the collection again to finish it.")
    settings = json.loads(manifest.read_text())
    expected = shard_shapes(settings)
    for shard in shards:
        try:
            shapes = _declared_shapes(shard)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Trajectory shard {shard} is corrupt ({error}); delete it and run the collection again.") from None
        if shapes != expected:
            raise ValueError(f"Trajectory shard {shard} holds {shapes}, not the {expected} of {MANIFEST}; delete it and run the collection again.")
    return Trajectories(shards, settings)


def shard_shapes(settings: dict) -> dict[str, tuple]:
    """The tensors of a shard collected with `settings` (a manifest) and their shapes."""
    layers, kv_heads, heads, dim = settings["num_layers"], settings["kv_heads"], settings["heads"], settings["head_dim"]
    tokens, queries = (layers, kv_heads, settings["sequence_length"], dim), (layers, heads, settings["query_positions"], dim)
    return {"keys": tokens, "values": tokens, "queries": queries, "forces": queries, "output_grads": queries, "positions": (settings["query_positions"],)}
