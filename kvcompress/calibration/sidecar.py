"""Training the sidecar (seeds 000-002) on trajectories of the frozen model.

**What a step sees.** One calibration sequence and one layer: every key and value of the sequence,
the sampled future queries of all its query heads, their forces dL/dq and output gradients dL/dy.
`regions` random stretches of `windows` consecutive windows of N tokens are merged by the network
(several windows at once, so super-tokens compete with each other), and every query after a stretch
attends over the exact rest of its causal context plus the stretch's super-tokens, in one softmax:
what the cache will do at inference. Real queries are joined by perturbed copies (query augmentation).
With gates (`KeptByGates`, keep-and-merge) the tokens they keep stay exact beside the super-tokens and the
network merges only the others, as the cache's keep-and-merge does.

**Losses** (each relative to the size of its target, so no term can win by shrinking or inflating
a scale, seed 001's two failures):

* ``consistency``: attention-output error, weighted per query by the size of its force;
* ``force``: the merged context's force ``J_merged^T dL/dy`` against the collected dL/dq (seed 000);
* ``jacobian``: ``J_merged v`` against ``J_dense v`` for random probes v (seed 002), by `torch.func.jvp`;
* ``norm``: squared log ratio of super-key (super-value) norms to the window's own;
* ``jacobian_ratio``: squared log ratio of the stretch's local Jacobian norms, merged over dense;
* ``diversity``: squared cosine between the super-keys of one window (k > 1), beyond that of the keys they merge.

**Diagnostics** (seed 001), on held-out sequences at every evaluation: K and V norm ratios, the
attention entropy ratio, the local Jacobian norm ratio (merged/dense) and output cosines. A ratio
outside [0.5, 2] (collapse or explosion) is reported at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import jvp
from tqdm.auto import tqdm

from kvcompress.attention_matching import MergedWindows, attention_matching_merge
from kvcompress.gate import GateCompressor
from kvcompress.rope import rotate, to_window_frame, window_frame_references
from kvcompress.sidecar import SidecarNetwork

from .trajectories import Trajectories

HEALTHY = (0.5, 2.0)
DROPPED = -1e4  # the bias of a slot that stands for no token: no attention, and no NaN where a stretch's every slot is dropped


@dataclass
class LossWeights:
    consistency: float = 1.0
    force: float = 1.0
    jacobian: float = 1.0
    norm: float = 0.01
    jacobian_ratio: float = 0.01
    diversity: float = 0.01

    @classmethod
    def output_matching_only(cls) -> LossWeights:
        """The ablation: force-weighted output consistency alone (seed 001's v1 objective)."""
        return cls(force=0.0, jacobian=0.0, norm=0.0, jacobian_ratio=0.0, diversity=0.0)


@dataclass
class KeptByGates:
    """Keep-and-merge's gates while the network trains: the tokens whose gate probability reaches the head's threshold for
    `keep_ratio` stay exact, and the network learns to merge the rest of each window (what it merges at inference)."""

    gates: GateCompressor
    keep_ratio: float

    def __post_init__(self):
        self.thresholds = self.gates.thresholds(self.keep_ratio)  # [layers, heads]

    def kept(self, keys: torch.Tensor, layer: int) -> torch.Tensor:
        """Which tokens ``[H, T]`` of one sequence's layer (keys ``[H, T, D]`` at positions 0..T-1) the gates keep."""
        probabilities = self.gates.probabilities(layer, keys[None], torch.arange(keys.shape[1], device=keys.device)[None])[0]
        return probabilities >= self.thresholds[layer].to(keys.device)[:, None]


@dataclass
class Stretch:
    """One step's data, float32: a sequence's layer, its queries and the stretches of windows to merge."""

    keys: torch.Tensor  # [H, T, D]
    values: torch.Tensor  # [H, T, D]
    queries: torch.Tensor  # [H, G, Q, D]: the P real queries, then perturbed copies
    positions: torch.Tensor  # [Q]
    forces: torch.Tensor  # [H, G, P, D]
    output_grads: torch.Tensor  # [H, G, P, D]
    starts: torch.Tensor  # [R]: first token of each stretch
    layer: int
    kept: torch.Tensor | None = None  # [H, T]: tokens held exact (keep-and-merge), merged by no window

    @property
    def real(self) -> int:
        return self.forces.shape[2]


def sample_stretches(data: Trajectories, sequence: int, layer: int, regions: int, span: int, sink: int,
                     augment: float, noise: float, generator: torch.Generator, device: str | torch.device = "cpu",
                     gates: KeptByGates | None = None) -> Stretch:
    """`regions` stretches of `span` tokens of one sequence's layer, with `augment` (a share of the real
    queries) perturbed query copies: Gaussian noise of `noise` times each query's RMS, and the tokens `gates`
    keep. The random draws are made on the CPU (the same on every device); the stretch is moved to `device` in float32."""
    part = data.layer(sequence, layer)
    keys, values = (part[name].to(device, torch.float32) for name in ("keys", "values"))
    heads, _, dim = keys.shape

    def grouped(tensor):  # [heads, P, D] -> [kv_heads, G, P, D]
        return tensor.to(device, torch.float32).view(heads, -1, tensor.shape[-2], dim)

    queries, forces, output_grads = (grouped(part[name]) for name in ("queries", "forces", "output_grads"))
    positions = part["positions"]
    latest = int(positions.max()) - span  # a stretch must end before the last query
    if latest < sink:
        raise ValueError(f"Sequences of {data.settings['sequence_length']} tokens are too short for stretches of {span} tokens; collect longer sequences.")
    starts = torch.randint(sink, latest + 1, (regions,), generator=generator)
    extra = int(augment * len(positions))
    if extra:
        pick = torch.randperm(len(positions), generator=generator)[:extra]
        chosen = queries[..., pick.to(device), :]
        rms = chosen.square().mean(-1, keepdim=True).sqrt()
        queries = torch.cat([queries, chosen + noise * rms * torch.randn(chosen.shape, generator=generator).to(device)], dim=-2)
        positions = torch.cat([positions, positions[pick]])
    kept = gates.kept(keys, layer) if gates is not None else None
    return Stretch(keys, values, queries, positions.to(device), forces, output_grads, starts.to(device), layer, kept)


@dataclass
class Merged:
    """Super-tokens of every stretch (keys/values ``[R, H, S, D]``, bias ``[R, H, S]``: `DROPPED` for a slot that stands
    for no token) and the stretches' own tokens ``[R, H, span, D]``, of which the gates keep `kept` ``[R, H, span]``."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    dense_keys: torch.Tensor
    dense_values: torch.Tensor
    kept: torch.Tensor


def merge_stretches(network: SidecarNetwork, batch: Stretch, windows: int, inv_freq: torch.Tensor, references: torch.Tensor) -> Merged:
    """Merge every window of every stretch as the cache does: in each window's frame, attention matching
    with `references` (the layer's reference queries in the window frame, ``[1, H, M, D]``), refined by one network call."""
    heads, _, dim = batch.keys.shape
    window, slots, regions = network.window, network.slots, len(batch.starts)
    device = batch.keys.device
    index = batch.starts[:, None] + torch.arange(windows * window, device=device)
    keys, values = batch.keys[:, index].transpose(0, 1), batch.values[:, index].transpose(0, 1)  # [R, H, span, D]
    window_starts = (batch.starts[:, None] + window * torch.arange(windows, device=device)).reshape(-1)

    def per_window(t):  # [R, H, span, ...] -> [R * windows, H, N, ...]
        return t.view(regions, heads, windows, window, *t.shape[3:]).transpose(1, 2).reshape(regions * windows, heads, window, *t.shape[3:])

    def per_stretch(t):  # [R * windows, H, k, ...] -> [R, H, windows * k, ...]
        t = t.view(regions, windows, heads, slots, *t.shape[3:]).transpose(1, 2)
        return t.reshape(regions, heads, windows * slots, *t.shape[4:])

    framed, window_values = to_window_frame(per_window(keys), window_starts, inv_freq), per_window(values)
    kept = batch.kept[:, index].transpose(0, 1) if batch.kept is not None else torch.zeros(keys.shape[:-1], dtype=torch.bool, device=device)
    excluded = per_window(kept)  # [R * windows, H, N]
    with torch.no_grad():
        start = attention_matching_merge(framed, window_values, references, slots, excluded=excluded)
    groups = (batch.layer * heads + torch.arange(heads, device=device)).repeat(regions * windows)
    flat = lambda t: t.reshape(regions * windows * heads, *t.shape[2:])  # noqa: E731
    merged_keys, merged_values, bias = network(
        flat(framed), flat(window_values), groups, MergedWindows(*(flat(t) for t in (start.keys, start.values, start.bias, start.selected))), flat(excluded))
    merged_keys = to_window_frame(merged_keys.view(regions * windows, heads, slots, dim), window_starts, inv_freq, inverse=False)
    merged_values, bias = merged_values.view(regions * windows, heads, slots, dim), bias.view(regions * windows, heads, slots)
    bias = bias.masked_fill(excluded.gather(-1, start.selected), DROPPED)  # a slot whose key is a kept token is dropped, as the cache drops it
    return Merged(per_stretch(merged_keys), per_stretch(merged_values), per_stretch(bias), keys, values, kept)


class StretchAttention:
    """The attention outputs a step compares, as functions of the queries (for `jvp` and force gradients).

    `merged(q)`: each stretch replaced by its super-tokens, the rest of the causal context exact, one
    softmax (``q [R, H, G, Q, D]``); `dense(q)`: the full causal context (``q [H, G, Q, D]``);
    `local_merged` / `local_dense`: the stretch's super-tokens / tokens alone.
    """

    def __init__(self, batch: Stretch, merged: Merged):
        self.batch, self.m = batch, merged
        self.scale = batch.keys.shape[-1] ** -0.5
        tokens = torch.arange(batch.keys.shape[1], device=batch.keys.device)
        span = merged.dense_keys.shape[2]
        causal = tokens[None, :] <= batch.positions[:, None]  # [Q, T]
        inside = (tokens[None, :] >= batch.starts[:, None]) & (tokens[None, :] < batch.starts[:, None] + span)  # [R, T]
        kept = batch.kept if batch.kept is not None else inside.new_zeros(1, len(tokens))  # [H or 1, T]: exact beside the super-tokens
        self.context = causal[None, None, None] & (~inside[:, None, None, None] | kept[None, :, None, None])  # [R, H or 1, 1, Q, T]
        self.kept_in_stretch = (merged.kept & ~merged.kept.all(-1, keepdim=True))[:, :, None, None]  # [R, H, 1, 1, span]: not merged (unless all are kept)
        self.causal = causal[None, None]
        self.valid = (batch.positions[None, :] >= batch.starts[:, None] + span)[:, None, None]  # [R, 1, 1, Q]: stretch wholly past

    def _slot_logits(self, q):
        return (q @ self.m.keys[:, :, None].transpose(-1, -2)) * self.scale + self.m.bias[:, :, None, None, :]

    def _merged_logits(self, q):
        """Logits over ``[exact context | super-tokens]``; the stretch's own tokens are masked out."""
        context = ((q @ self.batch.keys[None, :, None].transpose(-1, -2)) * self.scale).masked_fill(~self.context, float("-inf"))
        return torch.cat([context, self._slot_logits(q)], dim=-1)

    def _dense_logits(self, q):
        return ((q @ self.batch.keys[:, None].transpose(-1, -2)) * self.scale).masked_fill(~self.causal, float("-inf"))

    def merged(self, q):
        probabilities = self._merged_logits(q).softmax(-1)
        length = self.batch.keys.shape[1]
        return probabilities[..., :length] @ self.batch.values[None, :, None] + probabilities[..., length:] @ self.m.values[:, :, None]

    def dense(self, q):
        return self._dense_logits(q).softmax(-1) @ self.batch.values[:, None]

    def local_merged(self, q):
        return self._slot_logits(q).softmax(-1) @ self.m.values[:, :, None]

    def local_dense(self, q):
        logits = (q @ self.m.dense_keys[:, :, None].transpose(-1, -2)) * self.scale
        return logits.masked_fill(self.kept_in_stretch, float("-inf")).softmax(-1) @ self.m.dense_values[:, :, None]

    def entropy(self, q, merged: bool):
        probabilities = (self._merged_logits(q) if merged else self._dense_logits(q)).softmax(-1)
        return -(probabilities * probabilities.clamp(min=1e-30).log()).sum(-1)


def _relative(error: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """sum(mask * weight * |error|^2) / sum(mask * weight * |reference|^2) over [..., D] tensors."""
    mask = mask * weight
    return (error.square().sum(-1) * mask).sum() / (reference.square().sum(-1) * mask).sum().clamp(min=1e-30)


def _mean_squared_cosine(vectors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between distinct vectors of each set ``[..., n, D]`` -> ``[...]``, among those `present`
    ``[..., n]`` (0 for a set with fewer than two)."""
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    distinct = ~torch.eye(vectors.shape[-2], dtype=torch.bool, device=vectors.device)
    pairs = present[..., :, None] & present[..., None, :] & distinct
    return ((unit @ unit.transpose(-1, -2)).square() * pairs).sum((-1, -2)) / pairs.sum((-1, -2)).clamp(min=1)


def _mean_norm(t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean norm of the vectors of `t` ``[..., D]`` that `where` ``[...]`` selects (all of them where it selects none)."""
    norms = t.norm(dim=-1)
    return norms[where].mean() if bool(where.any()) else norms.mean()


def step_losses(network: SidecarNetwork, batch: Stretch, windows: int, inv_freq: torch.Tensor, references: torch.Tensor, weights: LossWeights,
                generator: torch.Generator, diagnose: bool = False) -> tuple[torch.Tensor, dict]:
    """The weighted training loss of one step and its terms, with the norm and Jacobian ratios (and, when
    `diagnose`, output cosines and the attention entropy ratio)."""
    merged = merge_stretches(network, batch, windows, inv_freq, references[batch.layer][None])
    attention = StretchAttention(batch, merged)
    regions, real = len(batch.starts), batch.real
    queries = batch.queries.expand(regions, *batch.queries.shape).clone().requires_grad_(True)
    probe = torch.randn(batch.queries.shape, generator=generator).to(queries.device)
    with torch.no_grad():
        dense, dense_jv = jvp(attention.dense, (batch.queries,), (probe,))
        local_dense_jv = jvp(attention.local_dense, (queries.detach(),), (probe.expand_as(queries),))[1]
    output, merged_jv = jvp(attention.merged, (queries,), (probe.expand_as(queries),))
    valid = attention.valid.float()
    force_size = batch.forces.norm(dim=-1)
    force_weight = torch.cat([force_size / force_size.mean().clamp(min=1e-30), force_size.new_ones(*force_size.shape[:2], queries.shape[-2] - real)], dim=-1)
    terms = {"consistency": _relative(output - dense, dense, valid, force_weight), "jacobian": _relative(merged_jv - dense_jv, dense_jv, valid)}
    if weights.force:
        force = torch.autograd.grad((output[..., :real, :] * batch.output_grads).sum(), queries, create_graph=True)[0][..., :real, :]
        terms["force"] = _relative(force - batch.forces, batch.forces, valid[..., :real])
    local_jv = jvp(attention.local_merged, (queries.detach(),), (probe.expand_as(queries),))[1]
    held = merged.bias > DROPPED  # slots standing for tokens, compared with the tokens merged (not those kept)
    ratios = {
        "key_norm_ratio": _mean_norm(merged.keys, held) / _mean_norm(merged.dense_keys, ~merged.kept),
        "value_norm_ratio": _mean_norm(merged.values, held) / _mean_norm(merged.dense_values, ~merged.kept),
        "jacobian_norm_ratio": (local_jv.norm(dim=-1) * valid).sum() / (local_dense_jv.norm(dim=-1) * valid).sum().clamp(min=1e-30),
    }
    terms["norm"] = ratios["key_norm_ratio"].log().square() + ratios["value_norm_ratio"].log().square()
    terms["jacobian_ratio"] = ratios["jacobian_norm_ratio"].log().square()
    if network.slots > 1:
        by_window = lambda t, size: t.reshape(regions, t.shape[1], windows, size, *t.shape[3:])  # noqa: E731
        merged_similarity = _mean_squared_cosine(by_window(merged.keys, network.slots), by_window(held, network.slots))
        dense_similarity = _mean_squared_cosine(by_window(merged.dense_keys, network.window), by_window(~merged.kept, network.window))
        terms["diversity"] = torch.relu(merged_similarity - dense_similarity).mean()  # no more alike than the window's merged keys
    if diagnose:
        with torch.no_grad():
            real_valid = valid[..., :real].expand(output[..., :real, 0].shape).bool()
            cosine = torch.nn.functional.cosine_similarity(output[..., :real, :], dense[..., :real, :], dim=-1)
            local = torch.nn.functional.cosine_similarity(attention.local_merged(queries.detach()), attention.local_dense(queries.detach()), dim=-1)
            entropy = attention.entropy(queries.detach(), merged=True), attention.entropy(batch.queries, merged=False).expand(regions, *batch.queries.shape[:-1])
            full_valid = valid.expand(entropy[0].shape).bool()
            ratios |= {
                "output_cosine": cosine[real_valid].mean(), "local_output_cosine": local[full_valid].mean(),
                "entropy_ratio": entropy[0][full_valid].mean() / entropy[1][full_valid].mean(),
                "output_error": terms["consistency"].sqrt(),
            }
    loss = sum(getattr(weights, name) * value for name, value in terms.items() if getattr(weights, name))
    return loss, {name: float(value.detach()) for name, value in (terms | ratios).items()}


def unhealthy(metrics: dict) -> list[str]:
    """The seed-001 ratios outside [0.5, 2]: collapse (below) or explosion (above)."""
    return [f"{name} {metrics[name]:.2f} ({'collapse' if metrics[name] < HEALTHY[0] else 'explosion'})"
            for name in ("key_norm_ratio", "value_norm_ratio", "jacobian_norm_ratio") if not HEALTHY[0] <= metrics[name] <= HEALTHY[1]]


def training_warnings(training: dict) -> list[str]:
    """What a calibration summary must say of a `train_sidecar` run: a network that never beat its starting point (the
    artifact is then plain attention matching), and diagnostics outside [0.5, 2]."""
    warnings = []
    trained = [entry["objective"] for entry in training["history"][1:]]
    if training["best_step"] == 0 and trained:
        warnings.append(
            f"the sidecar network never beat its starting point (held-out objective {training['initial']['objective']:.4f} untrained, "
            f"{min(trained):.4f} at best after training): the saved artifact is plain attention matching. Train longer (--sidecar-steps) "
            "or at another learning rate (--sidecar-lr)."
        )
    unhealthy_ratios = unhealthy(training["best"])
    if unhealthy_ratios:
        warnings.append(f"diagnostics outside [0.5, 2]: {', '.join(unhealthy_ratios)}")
    return warnings


@dataclass
class TrainingSettings:
    steps: int = 400
    windows: int = 4  # windows merged together per stretch: super-tokens compete with each other
    regions: int = 4  # stretches per step
    sink: int = 4
    augment: float = 0.25  # perturbed query copies, as a share of the real queries
    noise: float = 0.1
    learning_rate: float = 3e-4
    eval_every: int = 100
    eval_pairs: int = 20  # held-out (sequence, layer) pairs per evaluation
    seed: int = 0
    device: str = "cpu"  # where the network trains (the random draws stay on the CPU, so any device sees the same stretches)


def set_input_scales(network: SidecarNetwork, data: Trajectories) -> None:
    """Per (layer, head) RMS of keys and values over the data: the network's input and correction units."""
    with torch.no_grad():
        for layer in range(data.num_layers):
            parts = [data.layer(sequence, layer, names=("keys", "values")) for sequence in range(data.sequences)]
            for name, kind in (("key_scale", "keys"), ("value_scale", "values")):
                rms = torch.stack([part[kind].float().square().mean(dim=(1, 2)) for part in parts]).mean(0).sqrt()
                heads = len(rms)
                scale = getattr(network, name)
                scale[layer * heads : (layer + 1) * heads] = rms.clamp(min=1e-6).to(scale.device)


def evaluate_sidecar(network: SidecarNetwork, data: Trajectories, inv_freq: torch.Tensor, references: torch.Tensor, weights: LossWeights, settings: TrainingSettings,
                     gates: KeptByGates | None = None) -> dict:
    """Held-out losses and diagnostics, averaged over fixed (sequence, layer) pairs and stretches (merging what `gates` leave)."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    layers = data.num_layers
    totals, objective = {}, 0.0
    span = settings.windows * network.window
    for pair in range(settings.eval_pairs):
        batch = sample_stretches(data, pair % data.sequences, (pair * 7) % layers, settings.regions, span, settings.sink, 0.0, 0.0, generator, settings.device, gates)
        loss, metrics = step_losses(network, batch, settings.windows, inv_freq, references, weights, generator, diagnose=True)
        objective += float(loss.detach())
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value
    return {name: value / settings.eval_pairs for name, value in totals.items()} | {"objective": objective / settings.eval_pairs}


def train_sidecar(network: SidecarNetwork, train: Trajectories, heldout: Trajectories, inv_freq: torch.Tensor, references: References,
                  weights: LossWeights | None = None, settings: TrainingSettings | None = None, gates: KeptByGates | None = None) -> dict:
    """Train `network` in place, refining attention matching with `references`; keep the state with the lowest
    held-out objective. Returns the history (step 0: the untrained network, i.e. attention matching alone).
    With `gates` it learns to merge what they leave (keep-and-merge). It trains on `settings.device` and is back on the CPU at the end."""
    weights, settings = weights or LossWeights(), settings or TrainingSettings()
    if (train.num_layers, train.num_heads) != (network.shape["num_layers"], network.shape["num_heads"]):
        raise ValueError(f"Trajectories of {train.num_layers} layers x {train.num_heads} KV heads do not fit a sidecar for {network.shape['num_layers']} x {network.shape['num_heads']}.")
    network.to(settings.device)
    inv_freq = inv_freq.to(settings.device)
    set_input_scales(network, train)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, settings.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, settings.steps) / settings.steps)))
    span = settings.windows * network.window
    framed = window_frame_references(references.queries.to(settings.device), references.offsets.to(settings.device), network.window, inv_freq)
    initial = evaluate_sidecar(network, heldout, inv_freq, framed, weights, settings, gates)
    history, best = [{"step": 0} | initial], (initial["objective"], {k: v.clone() for k, v in network.state_dict().items()}, 0)
    progress = tqdm(range(1, settings.steps + 1), desc="sidecar", unit="step")
    for step in progress:
        network.train()
        sequence, layer = int(torch.randint(train.sequences, (1,), generator=generator)), int(torch.randint(train.num_layers, (1,), generator=generator))
        batch = sample_stretches(train, sequence, layer, settings.regions, span, settings.sink, settings.augment, settings.noise, generator, settings.device, gates)
        loss, metrics = step_losses(network, batch, settings.windows, inv_freq, framed, weights, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{float(loss.detach()):.4f}", k=f"{metrics['key_norm_ratio']:.2f}", v=f"{metrics['value_norm_ratio']:.2f}", j=f"{metrics['jacobian_norm_ratio']:.2f}")
        if step % settings.eval_every == 0 or step == settings.steps:
            network.eval()
            metrics = evaluate_sidecar(network, heldout, inv_freq, framed, weights, settings, gates)
            history.append({"step": step} | metrics)
            if metrics["objective"] < best[0]:
                best = (metrics["objective"], {k: v.clone() for k, v in network.state_dict().items()}, step)
            warning = unhealthy(metrics)
            progress.write(
                f"step {step}: held-out objective {metrics['objective']:.4f}, output error {metrics['output_error']:.4f}, cosine {metrics['output_cosine']:.4f}; "
                f"K/V norm ratio {metrics['key_norm_ratio']:.2f}/{metrics['value_norm_ratio']:.2f}, Jacobian norm ratio {metrics['jacobian_norm_ratio']:.2f}, "
                f"entropy ratio {metrics['entropy_ratio']:.3f}" + (f"  WARNING: {', '.join(warning)}" if warning else "")
            )
    network.load_state_dict(best[1])
    network.cpu().eval()
    return {"history": history, "initial": initial, "best_step": best[2], "best": next(h for h in history if h["step"] == best[2])}


@dataclass
class References:
    """Reference queries ``[L, kv_heads, M, D]`` (before RoPE) and their offsets ``[M]`` after a window's end."""

    queries: torch.Tensor
    offsets: torch.Tensor


def reference_queries(data: Trajectories, inv_freq: torch.Tensor, count: int = 64, recent_window: int = 32, seed: int = 0) -> References:
    """`count` calibration queries per layer and KV head (from its group's heads, RoPE undone), placed log-uniformly
    from `recent_window` tokens after a window's end to the sequence length (nearer queries attend a window more).
    Each pick is a (member of the group, sequence, query position), read one sequence at a time."""
    generator = torch.Generator().manual_seed(seed)
    layers, kv_heads, positions = data.num_layers, data.num_heads, data.settings["query_positions"]
    members = data.settings["heads"] // kv_heads
    pick = torch.randperm(members * data.sequences * positions, generator=generator)[:count]
    member, sequence, position = pick // (data.sequences * positions), pick // positions % data.sequences, pick % positions
    picked = torch.empty(layers, kv_heads, len(pick), data.settings["head_dim"])
    for index in sequence.unique().tolist():
        queries, query_positions = data.queries(index)  # [L, heads, P, D], [P]
        chosen = (sequence == index).nonzero()[:, 0]
        grouped = queries.view(layers, kv_heads, members, positions, -1)[:, :, member[chosen], position[chosen]].float()  # [L, kv_heads, n, D]
        picked[:, :, chosen] = rotate(grouped, query_positions[position[chosen]][None].expand(layers, -1), inv_freq, inverse=True)
    length = data.settings["sequence_length"]
    offsets = torch.exp(torch.empty(count).uniform_(math.log(recent_window), math.log(length), generator=generator)).round()
    return References(picked.contiguous(), offsets)
