"""Fitting the low-rank caches: PCA bases, KVSplice encoders/decoders and Fisher-guided ranks.

* PCA: per head, the mean and top principal directions of calibration keys (pre-RoPE) and values.
* KVSplice: per head, a linear encoder (with the latent scale/shift of seed 003) and decoder,
  started from PCA and trained by mini-batch gradient descent on what attention makes of them: the
  attention output of the collected queries over the collected keys of the same sequence, plus
  reconstruction as an auxiliary term. A linear autoencoder on reconstruction alone converges to
  PCA; the attention term is what can make it better. Each head keeps the parameters with the best
  held-out loss, so a head that does not improve stays at PCA.
* Fisher ranks: the empirical Fisher information of the LM loss with respect to each head's keys
  (pre-RoPE) and values. Dropping principal component i of a head costs, to second order,
  ``lambda_i * u_i^T F u_i / 2``; ranks are given greedily to the components that cost most to drop
  until the memory target is met.

Tokens in the attention sink are never compressed, so they are left out of every fit.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvcompress.config import HeadRanks, RankConfig
from kvcompress.rope import rotate

from .collect import AttentionSamples, attention_tap
from .training import VALIDATION_SEQUENCES, BestPerGroup


@dataclass
class KVData:
    """Calibration keys (pre-RoPE) and values per (layer, head), flattened to G = layers * heads groups."""

    keys: torch.Tensor  # [G, n, D], pre-RoPE
    values: torch.Tensor  # [G, n, D]
    key_positions: torch.Tensor  # [n]
    key_sequence: torch.Tensor  # [n]
    queries: torch.Tensor  # [G, m, D], post-RoPE
    query_positions: torch.Tensor  # [m]
    query_sequence: torch.Tensor  # [m]
    num_layers: int
    num_heads: int

    def to(self, device) -> KVData:
        """The same samples on `device` (KVSplice trains where the model runs)."""
        tensors = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return dataclasses.replace(self, **{name: value.to(device) for name, value in tensors.items() if isinstance(value, torch.Tensor)})

    @classmethod
    def from_samples(cls, samples: AttentionSamples, inv_freq: torch.Tensor, sink: int) -> KVData:
        layers, heads, _, dim = samples.keys.shape
        length = samples.sequence_length
        kept = samples.token_index % length >= sink
        positions = (samples.token_index % length)[kept]
        keys = samples.keys.cpu()[:, :, kept].float()  # fitting runs on the CPU: the samples are small
        unrotated = rotate(keys.reshape(layers * heads, 1, -1, dim), positions.expand(layers * heads, -1), inv_freq, inverse=True)
        return cls(
            unrotated[:, 0], samples.values.cpu()[:, :, kept].float().reshape(layers * heads, -1, dim), positions, samples.token_index[kept] // length,
            samples.queries.cpu().float().reshape(layers * heads, -1, dim), samples.query_token_index % length, samples.query_token_index // length,
            layers, heads,
        )


@dataclass
class Spectrum:
    """Per group: mean ``[G, D]``, principal directions as rows ``[G, D, D]`` and their variances ``[G, D]``."""

    mean: torch.Tensor
    directions: torch.Tensor
    variances: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor) -> Spectrum:
        mean = x.mean(dim=1)
        _, singular, directions = torch.linalg.svd(x - mean[:, None], full_matrices=False)
        return cls(mean, directions, singular**2 / x.shape[1])


def pca_heads(spectrum: Spectrum, ranks: list[int], exact: list[bool]) -> list[dict]:
    """Per group: encoder/decoder tensors of its top-`rank` principal directions (identity where `exact`)."""
    heads = []
    for group, rank in enumerate(ranks):
        dim = spectrum.mean.shape[1]
        if exact[group]:
            heads.append({"encoder": torch.eye(dim), "encoder_bias": torch.zeros(dim), "decoder": torch.eye(dim), "decoder_bias": torch.zeros(dim)})
            continue
        basis = spectrum.directions[group, :rank]  # [r, D]
        mean = spectrum.mean[group]
        heads.append({"encoder": basis.T.contiguous(), "encoder_bias": -(mean @ basis.T), "decoder": basis.contiguous(), "decoder_bias": mean.clone()})
    return heads


def group_ranks(ranks: RankConfig) -> tuple[list[int], list[int], list[bool]]:
    order = [ranks.heads[layer, head] for layer in range(ranks.num_layers) for head in range(ranks.num_kv_heads)]
    return [h.key for h in order], [h.value for h in order], [not h.enabled for h in order]


# ------------------------------------------------------------------------------------------ KVSplice
def _attention_output(queries, keys, values, mask, scaling):
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * scaling
    return torch.matmul(scores.masked_fill(~mask, float("-inf")).softmax(-1), values)


@torch.enable_grad()
def fit_kvsplice(
    data: KVData,
    ranks: RankConfig,
    inv_freq: torch.Tensor,
    steps: int = 300,
    learning_rate: float = 1e-3,
    reconstruction_weight: float = 0.1,
    validation_sequences: int = VALIDATION_SEQUENCES,
    evaluate_every: int = 25,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[list[dict], list[dict], dict]:
    """Train per-head encoders/decoders from PCA on `device`; returns (key heads, value heads, metrics), on the CPU."""
    key_ranks, value_ranks, exact = group_ranks(ranks)
    params = {  # PCA on the samples where they are (the CPU), then everything moves to `device`
        "key": _Autoencoder.from_pca(pca_heads(Spectrum.of(data.keys), key_ranks, exact), key_ranks).to(device),
        "value": _Autoencoder.from_pca(pca_heads(Spectrum.of(data.values), value_ranks, exact), value_ranks).to(device),
    }
    data, inv_freq = data.to(device), inv_freq.to(device)
    algos = [ranks.heads[layer, head].algo for layer in range(ranks.num_layers) for head in range(ranks.num_kv_heads)]
    trained = torch.tensor([algo == "kvsplice" and not is_exact for algo, is_exact in zip(algos, exact)], device=device)
    sequences = data.key_sequence.unique()
    if len(sequences) <= validation_sequences:
        raise ValueError(f"KVSplice needs samples from more than {validation_sequences} sequences to hold some out; collect from more text.")
    validation = sequences[-validation_sequences:]
    training = sequences[:-validation_sequences]
    dim = data.keys.shape[-1]
    scaling = dim**-0.5
    train_mask = trained[:, None, None].float()

    def loss_per_group(sequence_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        in_keys = torch.isin(data.key_sequence, sequence_ids)
        in_queries = torch.isin(data.query_sequence, sequence_ids)
        keys, values, positions = data.keys[:, in_keys], data.values[:, in_keys], data.key_positions[in_keys]
        queries = data.queries[:, in_queries]
        mask = (data.query_sequence[in_queries][:, None] == data.key_sequence[in_keys][None]) & (data.query_positions[in_queries][:, None] >= positions[None])
        live = mask.any(-1)
        queries, mask = queries[:, live], mask[live]
        rotated_positions = positions.expand(keys.shape[0], -1)
        exact_keys = rotate(keys[:, None], rotated_positions, inv_freq)[:, 0]
        target = _attention_output(queries, exact_keys, values, mask, scaling)
        keys_hat, values_hat = params["key"](keys), params["value"](values)
        output = _attention_output(queries, rotate(keys_hat[:, None], rotated_positions, inv_freq)[:, 0], values_hat, mask, scaling)
        attention_error = ((output - target) ** 2).sum((1, 2)) / (target**2).sum((1, 2))
        reconstruction = ((keys_hat - keys) ** 2).sum((1, 2)) / (keys**2).sum((1, 2)) + ((values_hat - values) ** 2).sum((1, 2)) / (values**2).sum((1, 2))
        return attention_error + reconstruction_weight * reconstruction, attention_error, reconstruction

    def validate() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return loss_per_group(validation)

    generator = torch.Generator().manual_seed(seed)
    initial = validate()
    modules = torch.nn.ModuleDict(params)
    best = BestPerGroup(modules, initial[0])
    optimizer = torch.optim.Adam(modules.parameters(), lr=learning_rate)
    for step in tqdm(range(1, steps + 1), desc="kvsplice", unit="step"):
        sequence = training[int(torch.randint(len(training), (1,), generator=generator))][None]
        loss = loss_per_group(sequence)[0]
        optimizer.zero_grad()
        (loss * trained).sum().backward()
        for module in params.values():
            module.mask_gradients(train_mask)
        optimizer.step()
        if step % evaluate_every == 0 or step == steps:
            best.update(modules, validate()[0])
    best.restore(modules)
    final = validate()
    metrics = {
        "validation_attention_error_pca": float(initial[1].mean()),
        "validation_attention_error": float(final[1].mean()),
        "validation_reconstruction_error_pca": float(initial[2].mean() / 2),
        "validation_reconstruction_error": float(final[2].mean() / 2),
        "heads_improved_over_pca": best.improved_groups,
    }
    return params["key"].export(key_ranks), params["value"].export(value_ranks), metrics


class _Autoencoder(torch.nn.Module):
    """All groups' encoders/decoders at once, padded to the largest rank (padding masked out)."""

    def __init__(self, encoder, encoder_bias, decoder, decoder_bias, rank_mask):
        super().__init__()
        self.encoder, self.encoder_bias = torch.nn.Parameter(encoder), torch.nn.Parameter(encoder_bias)
        self.scale, self.shift = torch.nn.Parameter(torch.ones_like(encoder_bias)), torch.nn.Parameter(torch.zeros_like(encoder_bias))
        self.decoder, self.decoder_bias = torch.nn.Parameter(decoder), torch.nn.Parameter(decoder_bias)
        self.register_buffer("rank_mask", rank_mask)

    @classmethod
    def from_pca(cls, heads: list[dict], ranks: list[int]) -> _Autoencoder:
        largest, dim = max(ranks), heads[0]["encoder"].shape[0]
        groups = len(heads)
        encoder, encoder_bias = torch.zeros(groups, dim, largest), torch.zeros(groups, 1, largest)
        decoder, decoder_bias = torch.zeros(groups, largest, dim), torch.stack([h["decoder_bias"] for h in heads])[:, None]
        for group, head in enumerate(heads):
            rank = head["encoder"].shape[1]
            encoder[group, :, :rank], encoder_bias[group, 0, :rank], decoder[group, :rank] = head["encoder"], head["encoder_bias"], head["decoder"]
        mask = (torch.arange(largest)[None] < torch.tensor(ranks)[:, None]).float()[:, None]
        return cls(encoder, encoder_bias, decoder, decoder_bias.clone(), mask)

    def forward(self, x):
        latents = ((torch.matmul(x, self.encoder) + self.encoder_bias) * self.scale + self.shift) * self.rank_mask
        return torch.matmul(latents, self.decoder) + self.decoder_bias

    def mask_gradients(self, trained: torch.Tensor) -> None:
        """Only heads marked for training move (the others stay PCA or exact)."""
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad *= trained.view(-1, *([1] * (parameter.dim() - 1)))

    def export(self, ranks: list[int]) -> list[dict]:
        """Fold the latent scale/shift into the encoder: per group encoder [D, r], bias [r], decoder [r, D], bias [D]."""
        with torch.no_grad():
            encoder = self.encoder * self.scale
            encoder_bias = (self.encoder_bias * self.scale + self.shift)[:, 0]
            heads = [{"encoder": encoder[g, :, :r], "encoder_bias": encoder_bias[g, :r], "decoder": self.decoder[g, :r], "decoder_bias": self.decoder_bias[g, 0]} for g, r in enumerate(ranks)]
            return [{name: tensor.to("cpu", copy=True) for name, tensor in head.items()} for head in heads]


# ------------------------------------------------------------------------------------------- Fisher
def _key_value_probes(layers: dict, layer: int, query, key, value, attend):
    """Zero probes added to the keys and values: their gradients are the loss's gradients w.r.t. them (for Fisher information)."""
    key_probe, value_probe = torch.zeros_like(key, requires_grad=True), torch.zeros_like(value, requires_grad=True)
    layers[layer] = (key_probe, value_probe)
    return attend(query, key + key_probe, value + value_probe)


@dataclass
class FisherInformation:
    """Empirical Fisher of the LM loss w.r.t. each group's keys (pre-RoPE) and values: ``[G, D, D]``."""

    keys: torch.Tensor
    values: torch.Tensor
    tokens: int

    def summary(self, num_heads: int) -> dict:
        """Per 'layer/head': trace, condition number and eigenvalue spectrum of the key and value Fisher."""
        report = {}
        for group in range(self.keys.shape[0]):
            entry = {}
            for kind, fisher in (("k", self.keys[group]), ("v", self.values[group])):
                spectrum = torch.linalg.eigvalsh(fisher.double()).flip(0).clamp(min=0)
                entry |= {
                    f"trace_{kind}": float(spectrum.sum()),
                    f"eigmax_{kind}": float(spectrum[0]),
                    f"cond_{kind}": float(spectrum[0] / spectrum[-1].clamp(min=1e-30)),
                    f"spectrum_{kind}": [float(x) for x in spectrum],
                }
            report[f"{group // num_heads}/{group % num_heads}"] = entry
        return report


@torch.enable_grad()
def fisher_information(model, token_ids: torch.Tensor, inv_freq: torch.Tensor, sequences: int = 8, sequence_length: int = 512, sink: int = 4) -> FisherInformation:
    """Accumulate ``g g^T`` of the loss gradient w.r.t. every key and value, over `sequences` sequences of the stream."""
    if len(token_ids) < sequences * sequence_length:
        raise ValueError(
            f"Too little calibration data for Fisher information: {len(token_ids)} tokens, need {sequences * sequence_length} "
            f"({sequences} sequences of {sequence_length}). Give more text or ask for fewer sequences."
        )
    keys_fisher = values_fisher = None
    counted = 0
    device = model.device  # the gradients of every layer are summed in float32 where the model starts
    positions, inv_freq = torch.arange(sequence_length, device=device), inv_freq.to(device)
    with attention_tap(model, _key_value_probes, probing=True) as probes:
        for index in tqdm(range(sequences), desc="fisher", unit="seq"):
            chunk = token_ids[index * sequence_length : (index + 1) * sequence_length][None].to(device)
            model(input_ids=chunk, labels=chunk, use_cache=False).loss.backward()
            layers = [probes[layer] for layer in sorted(probes)]
            key_grads = torch.stack([k.grad[0].to(device, torch.float32) for k, _ in layers])  # [L, H, T, D], w.r.t. post-RoPE keys
            value_grads = torch.stack([v.grad[0].to(device, torch.float32) for _, v in layers])
            num_layers, heads, _, dim = key_grads.shape
            key_grads = rotate(key_grads.reshape(num_layers * heads, 1, -1, dim), positions.expand(num_layers * heads, -1), inv_freq, inverse=True)[:, 0]
            key_grads, value_grads = key_grads[:, sink:], value_grads.reshape(num_layers * heads, -1, dim)[:, sink:]
            update_k, update_v = key_grads.transpose(1, 2) @ key_grads, value_grads.transpose(1, 2) @ value_grads
            keys_fisher = update_k if keys_fisher is None else keys_fisher + update_k
            values_fisher = update_v if values_fisher is None else values_fisher + update_v
            counted += key_grads.shape[1]
            probes.clear()
    return FisherInformation((keys_fisher / counted).cpu(), (values_fisher / counted).cpu(), counted)


def fisher_ranks(fisher: FisherInformation, key_spectrum: Spectrum, value_spectrum: Spectrum, template: RankConfig, target_memory_reduction: float, min_rank: int = 1) -> RankConfig:
    """Ranks that keep ``1 - target`` of the dense K/V dims, given where the Fisher-weighted variance is.

    Component i of a group is worth ``lambda_i * u_i^T F u_i`` (the loss its removal costs, to second
    order); dims go greedily to the most valuable next component of any group, keys and values alike.
    Heads the template marks as not enabled stay exact and count as full size.
    """
    if not 0 < target_memory_reduction < 1:
        raise ValueError(f"target_memory_reduction must be in (0, 1), got {target_memory_reduction!r}.")
    order = [(layer, head) for layer in range(template.num_layers) for head in range(template.num_kv_heads)]
    exact = [not template.heads[position].enabled for position in order]
    worth = {}
    for kind, info, spectrum in (("key", fisher.keys, key_spectrum), ("value", fisher.values, value_spectrum)):
        weighted = torch.einsum("gid,gde,gie->gi", spectrum.directions, info, spectrum.directions)
        worth[kind] = (spectrum.variances * weighted).tolist()
    dims = {"key": template.d_k, "value": template.d_v}
    total = len(order) * (template.d_k + template.d_v)
    budget = round((1 - target_memory_reduction) * total) - sum(template.d_k + template.d_v for e in exact if e)
    ranks = {(g, kind): (dims[kind] if exact[g] else min_rank) for g in range(len(order)) for kind in dims}
    budget -= sum(rank for (g, _), rank in ranks.items() if not exact[g])
    if budget < 0:
        raise ValueError(f"A {100 * target_memory_reduction:.0f}% memory reduction leaves less than rank {min_rank} per head; ask for less.")
    frontier = [(-worth[kind][g][min_rank], g, kind) for g in range(len(order)) for kind in dims if not exact[g] and min_rank < dims[kind]]
    heapq.heapify(frontier)
    while budget > 0 and frontier:
        _, g, kind = heapq.heappop(frontier)
        ranks[g, kind] += 1
        budget -= 1
        if ranks[g, kind] < dims[kind]:
            heapq.heappush(frontier, (-worth[kind][g][ranks[g, kind]], g, kind))
    heads = {
        position: template.heads[position] if exact[g] else HeadRanks(ranks[g, "key"], ranks[g, "value"], True, template.heads[position].algo)
        for g, position in enumerate(order)
    }
    return RankConfig(template.num_layers, template.num_kv_heads, template.d_k, template.d_v, heads, template.algo_default, target_memory_reduction)
