"""SidecarCache (seeds 000-002): every window of N tokens that leaves the recent window becomes k
synthesized super-tokens per KV head, each with its own additive attention-logit bias.

**Network.** `SidecarNetwork` reads a window's concatenated keys and values ``(N, 2 * head_dim)``,
mixes them with a small pre-norm transformer encoder and pools them with Set-Transformer blocks
(ISAB, then PMA with k seeds) into k outputs, each split into a key, a value and a logit bias. A
layer/head embedding lets one network serve the whole model. It refines a merge that already works:
the closed-form attention matching of `kvcompress.attention_matching` (kept keys, non-negative mass
biases, least-squares values, from the artifact's reference queries); each PMA seed also sees the
slot it refines, and its output layer starts at zero, so an untrained sidecar *is* attention
matching and training (force / Jacobian matching, `kvcompress/calibration/sidecar.py`) can only be judged by
what it adds.

**Position frame.** Keys arrive rotated by RoPE at their positions. The sidecar sees a window's keys
rotated back to the window's first position (so what it learns does not depend on where the window
sits) and its super-keys are rotated forward again; a query at position t then sees a super-key
exactly as it would see a key of the window's start.

**Merge options.** `merge="sidecar"` (default) runs the network on top of attention matching;
`merge="attention_matching"` stops at the closed-form merge. Its reference queries are calibration
queries before RoPE, rotated to positions after the window, so no inference-time query is needed.

**Keep-and-merge.** An artifact that carries gates (`SidecarCompressor.with_gates`) keeps the tokens its
gates mark (`keep_ratio=`), or under `ratio=` the most probable ones the budget has room for, exact, per head
(`GateKeep`), and merges the rest of each window: attention matching and the
network both mask the kept tokens out, and slots that would stand for no token are dropped. Measured on
SmolLM2-135M, exact tokens are worth more per byte than merged ones (docs/methods.md#keep-and-merge).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention_matching import MergedWindows, attention_matching_merge
from .config import ConfigError
from .gate import GateCompressor, GateKeep, gate_sections, gate_tensor_shapes, ratio_budget
from .hub import CompressorArtifact, FittedCache, frozen_module, same_base_model
from .memory import DEFAULT_CONTEXT, resolve_keep_ratio, slot_cost, window_for
from .policies import Encoding, LayerView
from .rope import to_window_frame, window_frame_references
from .schema import Field, size
from .settings import CacheSettings
from .slots import SYNTHESIZED, Slots

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MERGES = ("sidecar", "attention_matching")
MODES = ("keep_and_merge", "merge")


class _AttentionBlock(nn.Module):
    """Set Transformer's MAB(X, Y) in pre-norm form: X attends to Y, then a feed-forward layer."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_x, self.norm_y, self.norm_out = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.feed_forward = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, y: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
        normed_y = self.norm_y(y)
        x = x + self.attention(self.norm_x(x), normed_y, normed_y, key_padding_mask=excluded, need_weights=False)[0]
        return x + self.feed_forward(self.norm_out(x))


class SidecarNetwork(nn.Module):
    """Windows ``[W, N, D]`` of keys and values and a first merge of them -> k refined super-tokens: keys,
    values ``[W, k, D]`` and biases ``[W, k]``.

    ``groups [W]`` says which (layer * heads + head) each window belongs to. Keys are expected in the
    window's own frame (rotated back to its first position).
    """

    def __init__(
        self, num_layers: int, num_heads: int, head_dim: int, window: int, slots: int,
        width: int = 256, encoder_layers: int = 2, attention_heads: int = 4, inducing_points: int = 8,
    ):
        super().__init__()
        if not 1 <= slots <= window:
            raise ValueError(f"slots must be between 1 and the window ({window} tokens), got {slots}.")
        self.shape = {"num_layers": num_layers, "num_heads": num_heads, "head_dim": head_dim, "window": window, "slots": slots,
                      "width": width, "encoder_layers": encoder_layers, "attention_heads": attention_heads, "inducing_points": inducing_points}
        self.window, self.slots, self.head_dim = window, slots, head_dim
        self.key_in, self.value_in = nn.Linear(head_dim, width), nn.Linear(head_dim, width, bias=False)
        self.identity = nn.Embedding(num_layers * num_heads, width)
        self.position = nn.Parameter(torch.randn(window, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, attention_heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, encoder_layers, enable_nested_tensor=False)
        self.inducing = nn.Parameter(torch.randn(inducing_points, width) * 0.02)
        self.isab_in, self.isab_out = _AttentionBlock(width, attention_heads), _AttentionBlock(width, attention_heads)
        self.seeds = nn.Parameter(torch.randn(slots, width) * 0.02)
        self.slot_in = nn.Linear(2 * head_dim + 1, width)  # each PMA seed also sees the slot it refines
        self.pool = _AttentionBlock(width, attention_heads)
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2 * head_dim + 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # Per-group RMS of keys and values (set from calibration data): inputs in units of it, corrections too.
        self.register_buffer("key_scale", torch.ones(num_layers * num_heads))
        self.register_buffer("value_scale", torch.ones(num_layers * num_heads))

    def forward(
        self, keys: torch.Tensor, values: torch.Tensor, groups: torch.Tensor, start: MergedWindows, excluded: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Refine the slots `start` (keys/values ``[W, k, D]``, bias ``[W, k]``) of windows ``keys``/``values [W, N, D]``;
        the network does not see `excluded` ``[W, N]`` tokens (held exact elsewhere)."""
        count, length, dim = keys.shape
        if length != self.window:
            raise ValueError(f"This sidecar merges windows of {self.window} tokens, got {length}.")
        key_scale, value_scale = self.key_scale[groups][:, None, None], self.value_scale[groups][:, None, None]
        x = self.key_in(keys / key_scale) + self.value_in(values / value_scale) + self.identity(groups)[:, None] + self.position
        if excluded is not None:
            excluded = excluded & ~excluded.all(-1, keepdim=True)  # a wholly excluded window's slots are dropped by the caller
        x = self.encoder(x, src_key_padding_mask=excluded)
        inducing = self.isab_in(self.inducing.expand(count, -1, -1), x, excluded)
        x = self.isab_out(x, inducing)
        slots = torch.cat([start.keys / key_scale, start.values / value_scale, start.bias[..., None].clamp(min=-20) / 10], dim=-1)
        pooled = self.pool(self.seeds + self.slot_in(slots), x, excluded)
        correction = self.out(self.out_norm(pooled))  # [W, k, 2D + 1]
        merged_keys = start.keys + key_scale * correction[..., :dim]
        merged_values = start.values + value_scale * correction[..., dim : 2 * dim]
        return merged_keys, merged_values, start.bias + correction[..., -1]


class SidecarCompressor(CompressorArtifact):
    """A trained sidecar network, the RoPE frequencies, and reference queries for the attention-matching option.

    Tensors: ``network.*`` (the `SidecarNetwork` state), ``rope.inv_freq``, ``reference_queries
    [layers, kv_heads, M, D]`` (calibration queries of each KV head's group, before RoPE) and
    ``reference_offsets [M]`` (how far after a window's end each is placed).
    """

    method = "sidecar"
    cache_class_name = "SidecarCache"

    config_schema = CompressorArtifact.config_schema | gate_sections(required=False) | {
        "sidecar": Field(dict, fields={name: size() for name in ("num_layers", "num_heads", "head_dim", "window", "slots", "width", "encoder_layers", "attention_heads", "inducing_points")}),
        "training": Field(dict, required=False),
    }

    def read_config(self) -> None:
        base, shape = self.config["base_model"], self.config["sidecar"]
        if (shape["num_layers"], shape["num_heads"], shape["head_dim"]) != (base["num_layers"], base["num_kv_heads"], base["head_dim"]):
            raise ConfigError(f"The sidecar network's shape {shape} does not match the base model's {base['num_layers']} layers x {base['num_kv_heads']} KV heads x {base['head_dim']}.")
        try:
            with torch.device("meta"):  # shapes only: the weights file's tensors become its parameters (`validate`)
                self.network = SidecarNetwork(**shape)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ConfigError(f"The sidecar compressor's 'sidecar' section is invalid: {error}") from None

    def validate(self) -> None:
        super().validate()
        self.network.load_state_dict({name.removeprefix("network."): tensor.float() for name, tensor in self.tensors.items() if name.startswith("network.")}, assign=True)
        self.network.eval().requires_grad_(False)
        self.gate = None  # the gates it carries for keep-and-merge, as their own artifact (sharing these tensors)
        if "gates" in self.config:
            sections = {name: self.config[name] for name in ("base_model", "cache", "gates", "label") if name in self.config}
            self.gate = GateCompressor(sections, {name: self.tensors[name] for name in (*gate_tensor_shapes(self.config), "rope.inv_freq")})

    def expected_tensors(self) -> dict[str, tuple]:
        base = self.config["base_model"]
        network = {f"network.{name}": tuple(tensor.shape) for name, tensor in self.network.state_dict().items()}
        references = {"reference_queries": (base["num_layers"], base["num_kv_heads"], "references", base["head_dim"]), "reference_offsets": ("references",)}
        gates = gate_tensor_shapes(self.config) if "gates" in self.config else {}
        return super().expected_tensors() | network | references | gates

    def with_gates(self, gate: GateCompressor) -> SidecarCompressor:
        """This sidecar carrying `gate` (fitted for the same model): its caches keep the tokens the gates mark exact and merge
        the rest of each window (keep-and-merge), from one artifact."""
        if not isinstance(gate, GateCompressor):
            raise TypeError(f"with_gates needs a GateCompressor, got {type(gate).__name__}.")
        if not same_base_model(self.config["base_model"], gate.config["base_model"]):
            raise ValueError(
                f"The gates were fitted for {gate.config['base_model']['name_or_path']}, this sidecar for {self.config['base_model']['name_or_path']}: "
                "bundle gates fitted for the sidecar's model."
            )
        sections, tensors = gate.bundled()
        # the metrics measured the sidecar merging alone: a bundle is measured anew (calibrate --gates records its own)
        config = {name: value for name, value in self.config.items() if name not in ("gates", "label", "metrics")}
        config["calibration"] = config.get("calibration", {}) | {"bundled_gates": gate.config.get("calibration", {})}
        return type(self)(config | sections, self.tensors | tensors)

    @classmethod
    def from_network(
        cls, network: SidecarNetwork, reference_queries: torch.Tensor, reference_offsets: torch.Tensor, inv_freq: torch.Tensor, config: dict,
    ) -> SidecarCompressor:
        """The artifact of a trained `network`: with its reference queries ``[layers, kv_heads, M, D]`` (before RoPE) and their
        offsets ``[M]`` after a window's end, for the attention-matching merge, and the model's RoPE frequencies
        (`kvcompress.rope.rope_inv_freq`). `config` holds ``base_model`` (`kvcompress.hub.model_signature`) and ``cache``."""
        tensors = {f"network.{name}": tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
        tensors |= {"rope.inv_freq": inv_freq.float().cpu(), "reference_queries": reference_queries.float().cpu(), "reference_offsets": reference_offsets.float().cpu()}
        return cls(config | {"sidecar": network.shape}, tensors)

    @property
    def window(self) -> int:
        return self.network.window

    @property
    def slots(self) -> int:
        return self.network.slots

    def device_network(self, device) -> SidecarNetwork:
        """The network on `device`, moved once and shared by every cache made from this artifact."""
        def build() -> SidecarNetwork:
            if len(self.heads) == self.config["base_model"]["num_kv_heads"]:
                return self.network.to(device) if str(device) == "cpu" else copy.deepcopy(self.network).to(device)
            state = self.network.state_dict()
            state |= {name: self.own_heads(state[name], folded=True) for name in ("identity.weight", "key_scale", "value_scale")}  # per (layer, head)
            return frozen_module(lambda: SidecarNetwork(**self.network.shape | {"num_heads": len(self.heads)}), {name: t.to(device) for name, t in state.items()})

        return self.on_device("network", device, build)

    def window_frame_queries(self, layer_idx: int, device) -> torch.Tensor:
        """The layer's reference queries ``[1, H, M, D]`` rotated to their offsets after a window, in the window's frame."""
        return self.on_device("reference_queries", device, lambda: window_frame_references(
            self.own_heads(self.tensors["reference_queries"]).to(device), self.tensors["reference_offsets"].to(device), self.window, self.inv_freq(device),
        ))[layer_idx][None]

    def __repr__(self):
        gates = " with gates" if self.gate is not None else ""
        return f"{type(self).__name__}({self.config['base_model'].get('name_or_path')}, {self.window}:{self.slots} windows{gates})"


class SidecarMerge(Encoding):
    """Every block of N tokens leaving the window becomes `slots` super-tokens with an attention-logit bias each: the
    closed-form attention-matching merge, refined by the trained sidecar network (`merge="sidecar"`) or not."""

    uses_bias = True

    def __init__(self, compressor: SidecarCompressor, merge: str = "sidecar"):
        if not isinstance(compressor, SidecarCompressor):
            raise TypeError(f"SidecarCache needs a SidecarCompressor, got {type(compressor).__name__}.")
        if merge not in MERGES:
            raise ValueError(f"Unknown merge {merge!r}; choose from {', '.join(MERGES)}.")
        self.compressor, self.merging, self.artifacts = compressor, merge, (compressor,)

    def for_heads(self, heads: range) -> SidecarMerge:
        served = copy.copy(self)  # a subclass stays itself
        served.compressor = self.compressor.for_heads(heads)
        served.artifacts = (served.compressor,)
        return served

    def merge(self, layer: LayerView, blocks: Slots) -> Slots:
        count, heads, length, dim = blocks.keys.shape
        inv_freq = self.compressor.inv_freq(blocks.keys.device)
        starts = blocks.token_ids[:, 0, 0].long()  # blocks are whole, in order and aligned across heads
        keys = to_window_frame(blocks.keys.float(), starts, inv_freq)
        values = blocks.values.float()
        kept = blocks.keep  # keep-and-merge: the tokens the keep policy holds exact are merged without them
        merged = attention_matching_merge(keys, values, self.compressor.window_frame_queries(layer.layer_idx, keys.device), self.compressor.slots, excluded=kept)
        merged_keys, merged_values, bias = merged.keys, merged.values, merged.bias
        if self.merging == "sidecar":
            groups = (layer.layer_idx * heads + torch.arange(heads, device=keys.device)).repeat(count)
            flat = lambda t: None if t is None else t.reshape(count * heads, *t.shape[2:])  # noqa: E731
            start = MergedWindows(*(flat(t) for t in (merged_keys, merged_values, bias, merged.selected)))
            refined = self.compressor.device_network(keys.device)(flat(keys), flat(values), groups, start, flat(kept))
            merged_keys, merged_values, bias = (t.view(count, heads, *t.shape[1:]) for t in refined)
        merged_keys = to_window_frame(merged_keys, starts, inv_freq, inverse=False)
        token_ids = torch.full(bias.shape, SYNTHESIZED, dtype=blocks.token_ids.dtype, device=bias.device)
        dtype = blocks.keys.dtype
        slots = Slots(blocks.rows, merged_keys.to(dtype), merged_values.to(dtype), token_ids, bias=bias.float())
        if kept is None:
            return slots
        # A window's slots stand for its tokens that are not kept: a slot whose key is a kept token stands for none.
        stands_for_some = ~kept.gather(-1, merged.selected)
        scores = None if blocks.scores is None else torch.cat([blocks.scores, torch.full_like(slots.bias, 2.0)], dim=-1)  # above any probability: merged slots rank first
        return Slots(
            blocks.rows, torch.cat([blocks.keys, slots.keys], dim=2), torch.cat([blocks.values, slots.values], dim=2),
            torch.cat([blocks.token_ids, token_ids], dim=-1), scores=scores, bias=torch.cat([torch.zeros_like(kept, dtype=torch.float32), slots.bias], dim=-1),
            keep=torch.cat([kept, stands_for_some], dim=-1),
        )


class SidecarCache(FittedCache):
    """Windows of N old tokens merged into k super-tokens each. ``SidecarCache.from_pretrained("dir-or-hub-id", ratio=8)``.

    `mode`: "keep_and_merge" (the default for an artifact that carries gates) holds the tokens its gates mark
    exact, per head, and merges the rest of each window into the k super-tokens: a stated fact survives a
    merge fitted for prose. "merge" merges every token (the highest ratios). `merge`: "sidecar" (the
    trained network) or "attention_matching" (the closed-form rival, with the artifact's reference queries).
    `ratio`: the memory knob. In keep-and-merge a budget of slots that grows with the tokens seen, as the
    gates' (`kvcompress.gate.GateBudget`): 1/`ratio` of them from `context` tokens on, the merged slots first
    and each head's most probable tokens in the rest, a token without room when its window leaves being merged
    (or give `keep_ratio`: keep what the gates' thresholds mark, whatever it holds); in merge mode, dense bytes over held bytes at `context` tokens, met by the exact
    window (a lower ratio than the network's N:k buys a longer one; a higher one is refused). `window` is the exact
    recent window; blocks are the network's N.
    """

    artifact_class = SidecarCompressor

    def __init__(
        self, compressor: SidecarCompressor, *, mode: str | None = None, merge: str = "sidecar", keep_ratio: float | None = None,
        ratio: float | None = None, context: int = DEFAULT_CONTEXT, sink: int | None = None, window: int | None = None,
        config: PretrainedConfig | None = None,
    ) -> None:
        encoding = SidecarMerge(compressor, merge)
        if mode is None:  # keep_ratio= asks for keep-and-merge too (refused below without gates, saying why)
            mode = "keep_and_merge" if compressor.gate is not None or keep_ratio is not None else "merge"
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; choose from {', '.join(MODES)}.")
        settings = CacheSettings.resolve(compressor.cache_settings(), sink=sink, window=window, block_size=compressor.window)
        keep = None
        if mode == "merge":
            if keep_ratio is not None:
                raise ValueError("keep_ratio= says how many tokens keep-and-merge holds exact; mode='merge' keeps none.")
            dim = compressor.config["base_model"]["head_dim"]
            merged_cost = compressor.slots / compressor.window * slot_cost(2 * dim, dim, extra_bytes=8)
            window = window_for(ratio, window, context, merged_cost, settings, repr(compressor))
        elif compressor.gate is None:
            raise ValueError(
                f"{compressor!r} carries no gates, so it can only merge: use mode='merge', or bundle gates fitted for its model "
                "(kvcompress calibrate --method sidecar --gates GATE_DIR, or compressor.with_gates(gate))."
            )
        else:
            target = ratio_budget(compressor.gate, ratio, keep_ratio, context, settings, merged=compressor.slots / compressor.window)
            keep_ratio = resolve_keep_ratio(keep_ratio, ratio, context, lambda: target.kept, compressor.gate.default_keep_ratio)
            keep = GateKeep(compressor.gate, keep_ratio, target=target)
        super().__init__(keep, encoding, fitted=vars(settings), window=window, config=config)
        self.compressor, self.mode, self.keep_ratio = compressor, mode, keep_ratio

    def __repr__(self):
        knob = ""
        if self.mode == "keep_and_merge":
            knob = f", keep_ratio={self.keep_ratio:g}" if self.keep.target is None else f", ratio={self.keep.target.ratio:g}"
        return f"SidecarCache({self.compressor!r}, mode={self.mode}{knob}, merge={self.encoding.merging})"
