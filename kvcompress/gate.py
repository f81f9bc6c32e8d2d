"""Learned retention gates: per KV head, an MLP on a token's key predicts whether the token
will matter to future queries once it has left the recent window.

`GateBank` holds the gates of every head of every layer stacked (``[layers * heads, ...]``), so one
layer's heads are scored with three batched matmuls and no Python loop over heads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .hub import CompressorArtifact, FittedCache, frozen_module
from .memory import DEFAULT_CONTEXT, DEFAULT_KEEP_RATIO, kept_share, resolve_keep_ratio, slot_cost
from .policies import KeepPolicy, LayerView
from .rope import rotate
from .schema import Field, size
from .settings import MAX_TOKENS, Budget, CacheSettings, whole_number
from .slots import FILLER, STORE_ROOM, SYNTHESIZED, Slots

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class GateBank(torch.nn.Module):
    """Per-head MLPs ``head_dim -> hidden -> hidden -> 1`` (ReLU), returning retention logits."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, hidden: int = 256):
        super().__init__()
        self.num_layers, self.num_heads, self.head_dim, self.hidden = num_layers, num_heads, head_dim, hidden
        groups = num_layers * num_heads
        shapes = {"w1": (groups, head_dim, hidden), "w2": (groups, hidden, hidden), "w3": (groups, hidden, 1)}
        for name, shape in shapes.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(shape) * (2 / shape[1]) ** 0.5))
        for name, width in (("b1", hidden), ("b2", hidden), ("b3", 1)):
            self.register_parameter(name, torch.nn.Parameter(torch.zeros(groups, 1, width)))

    def forward(self, keys: torch.Tensor, groups: slice = slice(None)) -> torch.Tensor:
        """Logits ``[G, n]`` for keys ``[G, n, head_dim]`` of the gates in `groups` (default: all)."""
        hidden = torch.relu(torch.baddbmm(self.b1[groups], keys, self.w1[groups]))
        hidden = torch.relu(torch.baddbmm(self.b2[groups], hidden, self.w2[groups]))
        return torch.baddbmm(self.b3[groups], hidden, self.w3[groups])[..., 0]

    def layer_logits(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, H, n]`` of one layer's gates for its keys ``[B, H, n, head_dim]``."""
        batch, heads, length, dim = keys.shape
        flat = keys.transpose(0, 1).reshape(heads, batch * length, dim).to(self.w1.dtype)
        logits = self(flat, slice(layer * heads, (layer + 1) * heads))
        return logits.view(heads, batch, length).transpose(0, 1)


POLICIES = ("head", "layer")
SCORE_GRID = 4096  # gate probabilities are kept to 1/4096, so that rounding noise of the model's keys does not reorder equal keys
ALLOCATIONS = ("shared", "equal")  # one probability threshold for all heads, or the same share for each head


def fitted_thresholds(
    probabilities: torch.Tensor, keep_ratio: float, policy: str = "head", allocation: str = "shared", iterations: int = 40,
) -> torch.Tensor:
    """Per-head probability thresholds ``[layers, heads]`` that keep `keep_ratio` of held-out tokens.

    `probabilities` ``[layers, heads, n]`` are the gates' outputs on the same held-out tokens.
    `allocation` "shared": one probability threshold for every head (per layer for the "layer" policy),
    so heads whose gates expect more future attention keep more tokens (a single threshold;
    measured better on pass-key retrieval than equal shares). "equal": every head keeps the same
    share (one quantile level). `policy` "head": each head keeps its own tokens; "layer": a token
    is kept by every head of its layer when any of them keeps it.
    The level is found by bisection so that what the policy keeps is `keep_ratio` of the tokens.
    """
    if policy not in POLICIES:
        raise ValueError(f"Unknown retention policy {policy!r}; choose from {', '.join(POLICIES)}.")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"Unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}.")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1] (e.g. 0.125 to keep about one token in 8), got {keep_ratio!r}.")
    if keep_ratio == 1:
        return torch.zeros(probabilities.shape[:2])  # keep every token, including ones less likely than any held-out one
    ordered = probabilities.sort(dim=-1).values
    last = ordered.shape[-1] - 1
    layers, heads = probabilities.shape[:2]

    def at_level(level: torch.Tensor) -> torch.Tensor:  # level [layers] in [0, 1] -> thresholds [layers, heads]
        if allocation == "shared":
            return level[:, None].expand(layers, heads)
        index = (level * last).round().long().clamp(0, last)
        return ordered.gather(-1, index[:, None, None].expand(-1, heads, 1))[..., 0]

    if policy == "head" and allocation == "equal":
        return between_probabilities(probabilities, at_level(torch.full((layers,), 1 - keep_ratio)), allocation)
    low, high = torch.zeros(layers), torch.ones(layers)
    for _ in range(iterations):
        level = (low + high) / 2
        kept = probabilities >= at_level(level)[..., None]
        rate = kept.float().mean().expand(layers) if policy == "head" else kept.any(1).float().mean(-1)
        too_many = rate > keep_ratio
        low, high = torch.where(too_many, level, low), torch.where(too_many, high, level)
    return between_probabilities(probabilities, at_level(high), allocation)


def between_probabilities(probabilities: torch.Tensor, thresholds: torch.Tensor, allocation: str) -> torch.Tensor:
    """Each threshold moved to halfway between the held-out probabilities on either side of it (over the layer's heads for a
    shared threshold): the same held-out tokens are kept, and no threshold sits on a probability. A layer's first keys depend
    on the token alone, so a token seen in calibration scores its held-out probability again, give or take rounding, and a
    threshold on it would keep or drop the token by that rounding (which differs between a batch and its rows)."""
    pooled = probabilities.flatten(1)[:, None] if allocation == "shared" else probabilities
    level = thresholds[..., None]
    below = torch.where(pooled < level, pooled, -torch.inf).amax(-1)
    above = torch.where(pooled >= level, pooled, torch.inf).amin(-1)
    return torch.where(below.isfinite() & above.isfinite(), (below + above) / 2, thresholds)


def gate_tensor_shapes(config: dict) -> dict[str, tuple]:
    """The tensors of fitted gates and their shapes, from an artifact config with a ``gates`` section."""
    base = config["base_model"]
    layers, heads, dim = base["num_layers"], base["num_kv_heads"], base["head_dim"]
    hidden, groups = config["gates"]["hidden"], layers * heads
    return {
        "gates.w1": (groups, dim, hidden), "gates.b1": (groups, 1, hidden), "gates.w2": (groups, hidden, hidden),
        "gates.b2": (groups, 1, hidden), "gates.w3": (groups, hidden, 1), "gates.b3": (groups, 1, 1),
        "heldout_probabilities": (layers, heads, None),  # the gates' outputs on held-out tokens: thresholds are fitted on them
    }


def gate_sections(required: bool = True) -> dict:
    """The config sections of fitted gates (`kvcompress.schema`), for the gates' own artifact or one that carries them."""
    gates = {"hidden": size(), "keep_ratio": Field(float, required=False, low=0, high=1)}
    return {"gates": Field(dict, required=required, fields=gates), "label": Field(dict, required=False)}


class GateCompressor(CompressorArtifact):
    """Fitted gates, the RoPE frequencies to undo the rotation of keys, and the gates' held-out probabilities.

    Tensors: ``gates.{w1,b1,w2,b2,w3,b3}`` (the stacked `GateBank`), ``rope.inv_freq``, and
    ``heldout_probabilities [layers, heads, n]`` from which thresholds are fitted for any keep ratio.
    """

    method = "gate"
    cache_class_name = "GatedCache"
    config_schema = CompressorArtifact.config_schema | gate_sections()

    def expected_tensors(self) -> dict[str, tuple]:
        return super().expected_tensors() | gate_tensor_shapes(self.config)

    def bundled(self) -> tuple[dict, dict]:
        """This artifact's own config sections and tensors, for another artifact to carry (the sidecar's keep-and-merge)."""
        return {name: self.config[name] for name in ("gates", "label") if name in self.config}, {
            name: tensor for name, tensor in self.tensors.items() if name in gate_tensor_shapes(self.config)
        }

    @classmethod
    def from_gates(
        cls, gates: GateBank, heldout_probabilities: torch.Tensor, inv_freq: torch.Tensor, config: dict, keep_ratio: float = DEFAULT_KEEP_RATIO,
    ) -> GateCompressor:
        """The artifact of trained `gates`: with the model's RoPE frequencies (`kvcompress.rope.rope_inv_freq`) and the gates'
        probabilities on held-out tokens, from which thresholds are fitted for any keep ratio at load time. `config` holds
        ``base_model`` (`kvcompress.hub.model_signature`) and ``cache`` (sink, window, block_size); `keep_ratio` is what its
        caches keep without ratio= or keep_ratio= (`default_keep_ratio`)."""
        tensors = {f"gates.{name}": parameter.detach().float().contiguous() for name, parameter in gates.named_parameters()}
        tensors["rope.inv_freq"] = inv_freq.float().contiguous()
        tensors["heldout_probabilities"] = heldout_probabilities.reshape(gates.num_layers, gates.num_heads, -1).float().contiguous()
        return cls(config | {"gates": {"hidden": gates.hidden, "keep_ratio": keep_ratio}}, tensors)

    def bank(self, device: str | torch.device) -> GateBank:
        """The gate bank on `device`, built once and shared by every cache."""

        def build() -> GateBank:
            base = self.config["base_model"]
            state = {name.removeprefix("gates."): self.own_heads(t, folded=True).to(device, torch.float32) for name, t in self.tensors.items() if name.startswith("gates.")}
            return frozen_module(lambda: GateBank(base["num_layers"], len(self.heads), base["head_dim"], self.config["gates"]["hidden"]), state)

        return self.on_device("gates", device, build)

    def probabilities(self, layer_idx: int, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each token's gate probability ``[n, H, k]`` from its rotated `keys` ``[n, H, k, D]`` at `positions` ``[n, k]`` (the
        gates were trained on keys with RoPE undone), kept to 1/`SCORE_GRID`: what caches rank and threshold by."""
        unrotated = rotate(keys.float(), positions, self.inv_freq(keys.device), inverse=True)
        with torch.no_grad():
            probabilities = torch.sigmoid(self.bank(keys.device).layer_logits(layer_idx, unrotated))
        return (probabilities * SCORE_GRID).round() / SCORE_GRID  # equal keys score equal, whatever the rounding of the model

    @property
    def default_keep_ratio(self) -> float:
        """The share of tokens leaving the window that its caches keep when given neither ratio= nor keep_ratio=: the one it was
        calibrated (and measured) with."""
        return self.config["gates"].get("keep_ratio", DEFAULT_KEEP_RATIO)

    def thresholds(self, keep_ratio: float, policy: str = "head", allocation: str = "shared") -> torch.Tensor:
        """The served heads' thresholds ``[layers, heads]``, fitted over all of the model's heads (a shared threshold is the layer's)."""
        return self.own_heads(fitted_thresholds(self.tensors["heldout_probabilities"].float(), keep_ratio, policy, allocation))

    def __repr__(self):
        return f"GateCompressor({self.config['base_model'].get('name_or_path')})"


@dataclass(frozen=True)
class GateBudget:
    """A memory target for gates (``GatedCache(ratio=...)``): each head of layer l holds up to ``share[l] * allowed(seen)``
    old tokens, the highest gate probabilities first (with merged slots, see `merged`). ``allowed`` is what 1/`ratio` of the `seen` tokens leaves beside the
    sink, the window and a block's slack (as the baselines' `Budget.room`), but never less than `floor` of the other tokens: a short prompt cannot reach the
    ratio anyway, and a fact stated early is kept from the start. Thresholds instead keep what the gates mark, and the gates
    mark fewer tokens of plain prose than of their calibration text, so a ratio met by a threshold drifts with the text; and
    since a layer's store is as long as its fullest head, its other heads' room would hold fillers. Under the budget every
    head fills that room with its best tokens, and `share` (the gates' per-layer keep rate on held-out tokens at the
    thresholds of `kept`, over its mean) gives the layers whose gates keep more the room. Only the default thresholds
    (policy "head", allocation "shared": one probability for every head) let layers differ; the others are fitted per
    layer or head, so every share is about 1. Counted in tokens, as the baselines' budgets are. `merged`: the slots per handed
    token of a merge (k/N, keep-and-merge in `SidecarCache`): every layer holds its merged slots, and the layers' shares split
    what the budget leaves beside them."""

    ratio: float
    floor: float
    share: torch.Tensor  # [layers]
    merged: float = 0.0

    @property
    def kept(self) -> float:
        """The share of old tokens held exact at the context the budget was fitted for (about: the merge counts the tokens handed)."""
        return self.floor - self.merged

    def tokens(self, layer_idx: int, seen: torch.Tensor, settings: CacheSettings) -> torch.Tensor:
        """Slots each head of layer `layer_idx` may hold, per row (``[B]``): never fewer than its merged slots."""
        exact = budget_slack(settings)
        allowed = torch.maximum(self.floor * (seen - exact), seen / self.ratio - exact)
        merged = self.merged * (seen - settings.sink - settings.window).clamp(min=0)  # at least the merged slots held
        return (merged + (allowed - merged).clamp(min=0) * float(self.share[layer_idx])).floor().long().clamp(min=0)


def ratio_budget(
    compressor: GateCompressor, ratio: float | None, keep_ratio: float | None, context: int, settings: CacheSettings,
    policy: str = "head", allocation: str = "shared", merged: float = 0.0,
) -> GateBudget | None:
    """The budget that ``ratio=`` asks of `compressor`'s gates at `context` tokens, with `merged` of the old tokens in merged
    slots; None where there is none (no ratio, keep_ratio= instead, or 1:1). Its `kept` share is then the keep ratio."""
    if ratio is None or keep_ratio is not None:
        return None
    ratio, slack = Budget(ratio=ratio).ratio, budget_slack(settings)  # checked
    if ratio == 1:
        return None
    floor = kept_share(ratio, context, slack)
    handed = context - settings.sink - settings.window  # the most a merge can have taken
    if floor * (context - slack) <= merged * handed:
        raise ValueError(
            f"The merged slots alone hold more than 1/{ratio:g} of the dense cache at {context} tokens (at most "
            f"{context / (context - handed + handed * merged):.2f}:1 with no token kept): ask for a lower ratio, or give the "
            "context you expect (context=; longer contexts compress more)."
        )
    probabilities = compressor.tensors["heldout_probabilities"].float()  # every head's, so that ranks share the layers' shares
    shares = layer_shares(probabilities, fitted_thresholds(probabilities, floor - merged, policy, allocation), policy)  # above 0: checked
    return GateBudget(ratio, floor, shares, merged)


def budget_slack(settings: CacheSettings) -> int:
    """Tokens a budget leaves beside the old ones: the sink, the window and a block's slack (as the baselines' `Budget.room`)."""
    return settings.sink + settings.window + settings.block_size - 1


def layer_shares(probabilities: torch.Tensor, thresholds: torch.Tensor, policy: str) -> torch.Tensor:
    """Each layer's keep rate ``[layers]`` on held-out tokens at `thresholds` (a union over heads for policy "layer"), over its mean."""
    kept = probabilities >= thresholds[..., None]
    rate = (kept.any(1) if policy == "layer" else kept).float().flatten(1).mean(1)
    return rate / rate.mean()


def ranking(token_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Each slot's place ``[B, H, S]`` when a head's slots are ranked by score, the newest first among equals, fillers last."""
    newest_first = token_ids.argsort(dim=-1, descending=True, stable=True)
    ranked = scores.masked_fill(token_ids == FILLER, float("-inf")).gather(-1, newest_first)
    return newest_first.gather(-1, ranked.argsort(dim=-1, descending=True, stable=True)).argsort(dim=-1)


class GateKeep(KeepPolicy):
    """Keep a token leaving the window when its gate's probability reaches the head's threshold (fitted for
    `keep_ratio` on held-out tokens), per head or by union over the layer's heads (`policy`); or, with a `target` (`GateBudget`),
    the tokens of highest probability that fit it; where merged slots share the target, a token the target has no room
    for when it leaves the window goes to the merge. `max_tokens` caps each head's kept tokens, lowest probabilities first."""

    keeps_scores = True  # the store keeps each slot's gate probability (for the cap)

    def __init__(
        self, compressor: GateCompressor, keep_ratio: float = DEFAULT_KEEP_RATIO, policy: str = "head", allocation: str = "shared", max_tokens: int | None = None,
        target: GateBudget | None = None,
    ):
        if not isinstance(compressor, GateCompressor):
            raise TypeError(f"Gating needs a GateCompressor, got {type(compressor).__name__}.")
        if max_tokens is not None:
            max_tokens = whole_number("max_tokens", max_tokens, "a positive number of tokens per head", 1, MAX_TOKENS)
        self.compressor, self.keep_ratio, self.policy, self.allocation, self.max_tokens = compressor, keep_ratio, policy, allocation, max_tokens
        self.target = target  # not `budget`: that names a baseline's `Budget`, whose in-place step the engine runs
        self.thresholds = compressor.thresholds(keep_ratio, policy, allocation)  # [layers, heads]
        self.per_head = policy == "head"
        self.artifacts = (compressor,)

    def for_heads(self, heads: range) -> GateKeep:
        if self.policy == "layer":
            raise ValueError(
                "policy='layer' keeps a token in every head of a layer when any of them keeps it, and tensor parallelism splits a "
                "layer's heads over the ranks: use policy='head'."
            )
        served = copy.copy(self)  # a subclass stays itself
        served.compressor = self.compressor.for_heads(heads)
        served.thresholds, served.artifacts = self.thresholds[:, heads.start : heads.stop], (served.compressor,)
        return served

    def choose(self, layer: LayerView, blocks: Slots) -> Slots:
        probabilities = self.compressor.probabilities(layer.layer_idx, blocks.keys, blocks.token_ids[:, 0])  # [n, H, k]
        if self.target is not None:  # every token is a candidate: `bound` keeps the most probable that fit
            if self.policy == "layer":  # a token's score is its best head's, so that every head ranks the same
                probabilities = probabilities.amax(dim=1, keepdim=True).expand_as(probabilities)
            if not self.target.merged:
                return Slots(blocks.rows, blocks.keys, blocks.values, blocks.token_ids, scores=probabilities)
            keep = self.fits(layer, blocks, probabilities)
            return Slots(blocks.rows, blocks.keys, blocks.values, blocks.token_ids, scores=probabilities, keep=keep)
        keep = probabilities >= self.thresholds[layer.layer_idx].to(probabilities.device)[None, :, None]
        if self.policy == "layer":
            keep = keep.any(dim=1, keepdim=True).expand_as(keep)
        return Slots(blocks.rows, blocks.keys, blocks.values, blocks.token_ids, scores=probabilities, keep=keep)

    def fits(self, layer: LayerView, blocks: Slots, probabilities: torch.Tensor) -> torch.Tensor:
        """Which tokens of `blocks` (scored `probabilities` ``[n, H, N]``) rank, among them and the tokens the store holds
        exact, as `bound` ranks them, within the target's room for exact tokens: its slots less the merged slots held and
        to come (its share of each block). The merge takes the others."""
        store_ids, store_scores = layer.store["token_ids"], layer.store["scores"]
        count, heads, length = probabilities.shape
        rows, device = blocks.rows, probabilities.device
        per_row = torch.bincount(rows, minlength=store_ids.shape[0])
        merged = (store_ids == SYNTHESIZED).sum(-1) + (per_row * round(self.target.merged * length))[:, None]
        room = self.target.tokens(layer.layer_idx, layer.seen, layer.settings)[:, None] - merged  # [B, H]
        block_in_row = torch.arange(count, device=device) - (per_row.cumsum(0) - per_row)[rows]  # blocks come row by row
        where = (rows[:, None, None], torch.arange(heads, device=device)[None, :, None], (block_in_row[:, None] * length + torch.arange(length, device=device))[:, None, :])
        ids = store_ids.new_full((len(per_row), heads, int(per_row.max()) * length), FILLER)
        scores = store_scores.new_zeros(ids.shape)
        ids[where], scores[where] = blocks.token_ids.to(ids.dtype), probabilities.to(scores.dtype)
        exact = store_ids.masked_fill(store_ids < 0, FILLER)  # the merged slots are not ranked: they stay
        place = ranking(torch.cat([exact, ids], dim=-1), torch.cat([store_scores, scores], dim=-1))[..., store_ids.shape[-1] :]
        return place[where] < room[rows][..., None]

    def bound(self, layer: LayerView, token_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        caps = [torch.full_like(layer.seen, self.max_tokens)] if self.max_tokens is not None else []
        if self.target is not None:
            caps.append(self.target.tokens(layer.layer_idx, layer.seen, layer.settings))
        if not caps:
            return None
        return ranking(token_ids, scores) < torch.stack(caps).amin(0)[:, None, None]

    def __repr__(self):
        # Under a budget each head holds its most probable tokens that fit; the keep ratio then only sets the layers' shares.
        knob = f"keep_ratio={self.keep_ratio:g}" if self.target is None else f"ratio={self.target.ratio:g}"
        others = {"policy": (self.policy, "head"), "allocation": (self.allocation, "shared"), "max_tokens": (self.max_tokens, None)}
        return f"GateKeep({', '.join([knob] + [f'{name}={value}' for name, (value, default) in others.items() if value != default])})"


def gate_keep_ratio(compressor: GateCompressor, ratio: float, settings: CacheSettings, context: int, policy: str = "head", allocation: str = "shared",
                    token_cost: float | None = None) -> float:
    """The keep ratio at which gates hold 1/`ratio` of the dense bytes at `context` tokens, from the artifact's held-out
    probabilities: what each head keeps at the thresholds of a keep ratio, padded to the layer's fullest head (the store is
    rectangular), with the store's room to grow. `token_cost`: a kept token-head in dense tokens (default: key, value, token
    id and gate score)."""
    probabilities = compressor.tensors["heldout_probabilities"].float()
    head_dim = compressor.config["base_model"]["head_dim"]
    token_cost = slot_cost(2 * head_dim, head_dim, extra_bytes=8) if token_cost is None else token_cost
    ratio = Budget(ratio=ratio).ratio
    exact = settings.sink + settings.window + 1.5 * settings.block_size  # the tail: on average half a block waiting, and room for one

    def held(keep_ratio: float) -> float:
        kept = probabilities >= compressor.thresholds(keep_ratio, policy, allocation)[..., None]
        if policy == "layer":
            kept = kept.any(1, keepdim=True)
        return float(kept.float().mean(-1).amax(-1).mean()) * (1 + 1 / STORE_ROOM)

    return kept_share(ratio, context, exact, token_cost, held)


class GatedCache(FittedCache):
    """Learned retention gates. ``GatedCache.from_pretrained("dir-or-hub-id", ratio=8)`` or ``(..., keep_ratio=0.125)``.

    `ratio`: the memory knob, a budget of tokens that grows with the tokens seen (`GateBudget`): 1/`ratio` of
    them from `context` tokens on, and below it the share of old tokens kept at `context` (fewer tokens compress
    less, as the exact sink and window weigh more); each head holds its gate's most probable tokens. `keep_ratio`:
    instead, keep the tokens leaving the window whose probability reaches a threshold fitted to keep that share
    of held-out calibration tokens (default: the one it was calibrated with, `default_keep_ratio`); what that holds depends on the text. `policy` "head" (each
    head keeps its own tokens) or "layer" (a token is kept by all heads of the layer when any of them keeps it);
    `allocation` "shared" (one probability threshold for every head: heads keep what their gates expect to be
    needed) or "equal" (every head keeps the same share); under a budget they set the layers' shares only.
    `max_tokens` optionally caps each head's kept tokens (lowest gate probabilities go first).
    """

    artifact_class = GateCompressor

    def __init__(
        self, compressor: GateCompressor, keep_ratio: float | None = None, *, ratio: float | None = None, context: int = DEFAULT_CONTEXT,
        policy: str = "head", allocation: str = "shared", max_tokens: int | None = None, sink: int | None = None, window: int | None = None,
        block_size: int | None = None, config: PretrainedConfig | None = None,
    ) -> None:
        if not isinstance(compressor, GateCompressor):
            raise TypeError(f"GatedCache needs a GateCompressor, got {type(compressor).__name__}.")
        settings = CacheSettings.resolve(compressor.cache_settings(), sink=sink, window=window, block_size=block_size)
        target = ratio_budget(compressor, ratio, keep_ratio, context, settings, policy, allocation)
        keep_ratio = resolve_keep_ratio(keep_ratio, ratio, context, lambda: target.kept, compressor.default_keep_ratio)
        target = target if keep_ratio < 1 else None  # a ratio that every token meets: dense
        super().__init__(GateKeep(compressor, keep_ratio, policy, allocation, max_tokens, target), fitted=vars(settings), config=config)
        self.compressor, self.keep_ratio = compressor, keep_ratio

    def __repr__(self):
        return f"GatedCache({self.keep!r})"
