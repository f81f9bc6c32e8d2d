"""Training the retention gates of seed 004: labels from the frozen model's attention, a balanced
binary classifier per KV head, and the reports that say how good each gate is.

**Label.** Per layer and KV head, a token is *positive* when, after it has left the local window
of `window` tokens, some future query gives it at least `threshold` of its attention (the
probability averaged over the query heads of the GQA group). Its score is that largest share:
``max over queries i >= j + window of mean over the group of p[i, j]``. Tokens of the attention
sink (never evicted) and tokens with fewer than `min_future` queries after leaving the window (too
little future to judge) are not labelled.

**Gate input.** The key before RoPE (the rotation at the token's position is undone), so a gate
judges what a token is, not where it sits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvcompress.gate import GateBank
from kvcompress.models import kv_shape
from kvcompress.rope import rotate

from .collect import recording_attention
from .training import VALIDATION_SEQUENCES, BestPerGroup

LABEL_SEQUENCE = 1024  # tokens per calibration sequence: the text is read in whole sequences, a shorter rest is left out


def labelled_tokens(available: int, max_tokens: int, sequence_length: int = LABEL_SEQUENCE) -> int:
    """Calibration tokens `collect_retention_labels` reads of `available` ones when asked for at most `max_tokens`."""
    return min(available, max_tokens) // sequence_length * sequence_length


@dataclass
class RetentionLabels:
    """Labelled keys per group (G = layers * KV heads); the same tokens for every group."""

    keys: torch.Tensor  # [G, n, D], pre-RoPE, float32
    future_attention: torch.Tensor  # [G, n]: the largest attention share from a query beyond the window
    sequence: torch.Tensor  # [n]: which calibration sequence each token came from
    num_layers: int
    num_heads: int
    window: int
    threshold: float
    token_index: torch.Tensor | None = None  # [n]: each token's place in the calibration token stream

    @property
    def labels(self) -> torch.Tensor:
        return self.future_attention >= self.threshold

    def positive_rate(self) -> torch.Tensor:
        return self.labels.float().mean(dim=1)

    def positive_rate_among(self, tokens: torch.Tensor) -> float:
        """Mean positive rate over all heads of the labelled tokens that `tokens` (a mask over the stream) marks."""
        return float(self.labels[:, tokens[self.token_index]].float().mean())


@torch.no_grad()
def collect_retention_labels(
    model, token_ids: torch.Tensor, inv_freq: torch.Tensor, window: int = 64, sink: int = 4, threshold: float = 0.02,
    sequence_length: int = LABEL_SEQUENCE, min_future: int = 64, max_tokens: int | None = None,
) -> RetentionLabels:
    """Run `model` over `token_ids` in sequences of `sequence_length` and label every token that can be judged."""
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    last = sequence_length - window - min_future  # labelled positions: sink .. last-1
    if last <= sink or len(ids) < sequence_length:
        raise ValueError(
            f"Too little calibration data for retention labels: need sequences of {sequence_length} tokens with room for the "
            f"sink ({sink}), the window ({window}) and {min_future} future queries; the text has {len(ids)} tokens."
        )
    keys, future, sequences, token_index = [], [], [], []
    positions = torch.arange(sink, last)
    distance = torch.arange(sequence_length)[:, None] - torch.arange(sequence_length)[None]  # query i minus key j
    on_device = {}  # device -> (causal mask, beyond-the-window mask, positions, RoPE frequencies): each layer's device, once
    with recording_attention(model) as recorded:
        for index, start in enumerate(tqdm(range(0, len(ids) - sequence_length + 1, sequence_length), desc="labels", unit="seq")):
            model(input_ids=ids[start : start + sequence_length][None].to(model.device), use_cache=False)
            layer_keys, layer_future = [], []
            for layer in sorted(recorded):
                query, key, _ = recorded[layer]
                query, key = query[0].float(), key[0].float()  # float32 attention, on the layer's own device
                if key.device not in on_device:
                    on_device[key.device] = tuple(t.to(key.device) for t in (distance >= 0, distance >= window, positions, inv_freq))
                causal, causal_future, key_positions, frequencies = on_device[key.device]
                heads, dim = key.shape[0], key.shape[-1]
                grouped = query.view(heads, -1, sequence_length, dim)
                scores = torch.matmul(grouped, key[:, None].transpose(-1, -2)) * dim**-0.5
                probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).mean(dim=1)  # [H, i, j]
                share = probs.masked_fill(~causal_future, 0.0).amax(dim=1)  # [H, j]
                layer_future.append(share[:, sink:last].cpu())
                unrotated = rotate(key[:, sink:last][None], key_positions[None], frequencies, inverse=True)[0]
                layer_keys.append(unrotated.cpu())  # what is kept (the labelled tokens) waits on the CPU
            keys.append(torch.cat(layer_keys))
            future.append(torch.cat(layer_future))
            sequences.append(torch.full((last - sink,), index))
            token_index.append(start + positions)
            recorded.clear()
    num_layers, num_heads, _ = kv_shape(model.config)
    return RetentionLabels(
        torch.cat(keys, 1), torch.cat(future, 1), torch.cat(sequences), num_layers, num_heads, window, threshold, torch.cat(token_index),
    )


def _balanced_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per group: mean of the BCE over positives and over negatives (each class weighs half)."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    positives, negatives = labels.float(), (~labels).float()
    return 0.5 * (loss * positives).sum(1) / positives.sum(1).clamp(min=1) + 0.5 * (loss * negatives).sum(1) / negatives.sum(1).clamp(min=1)


def auc_per_group(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ROC AUC of each row of `scores` ``[G, n]`` against `labels` (Mann-Whitney; NaN without both classes)."""
    ranks = scores.argsort(dim=1).argsort(dim=1).double() + 1
    positives = labels.double().sum(1)
    negatives = labels.shape[1] - positives
    rank_sum = (ranks * labels.double()).sum(1)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def train_gates(
    data: RetentionLabels, hidden: int = 256, steps: int = 600, batch: int = 256, learning_rate: float = 1e-3,
    validation_sequences: int = VALIDATION_SEQUENCES, evaluate_every: int = 50, patience: int = 4, seed: int = 0, device: str | torch.device = "cpu",
) -> tuple[GateBank, torch.Tensor, dict]:
    """Train every head's gate at once on balanced batches on `device`; each head keeps its best held-out state.
    The batches are drawn on the CPU, so every device trains on the same tokens.

    Returns the gates and their probabilities on the held-out tokens ``[G, n]`` (both on the CPU) and the report on them.
    """
    sequences = data.sequence.unique()
    if len(sequences) <= validation_sequences:
        raise ValueError(f"Gate training needs labels from more than {validation_sequences} sequences to hold some out; collect from more text.")
    held_out = torch.isin(data.sequence, sequences[-validation_sequences:])
    labels = data.labels
    train_keys, train_labels = data.keys[:, ~held_out].to(device), labels[:, ~held_out]
    valid_keys, valid_labels = data.keys[:, held_out].to(device), labels[:, held_out].to(device)
    with torch.random.fork_rng(devices=[]):  # the initial weights follow `seed` without touching the caller's random state
        torch.manual_seed(seed)
        gates = GateBank(data.num_layers, data.num_heads, data.keys.shape[-1], hidden).to(device)
    scale = train_keys.std(dim=1, keepdim=True).clamp(min=1e-6)  # keys vary a lot in scale across heads; fold a per-dim scale into w1
    with torch.no_grad():
        gates.w1 /= scale.transpose(1, 2)
    optimizer = torch.optim.Adam(gates.parameters(), lr=learning_rate)

    def validation_loss() -> torch.Tensor:
        with torch.no_grad():
            return _balanced_loss(gates(valid_keys), valid_labels)

    best = BestPerGroup(gates, validation_loss())
    generator = torch.Generator().manual_seed(seed)
    half = batch // 2
    weights = {True: train_labels.float() + 1e-12, False: (~train_labels).float() + 1e-12}  # oversample each class to half a batch
    stale = 0
    progress = tqdm(range(1, steps + 1), desc="gates", unit="step")
    for step in progress:
        index = torch.cat([torch.multinomial(weights[cls], half, replacement=True, generator=generator) for cls in (True, False)], dim=1)
        keys = train_keys.gather(1, index.to(device)[..., None].expand(-1, -1, train_keys.shape[-1]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(gates(keys), train_labels.gather(1, index).float().to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % evaluate_every == 0:
            stale = 0 if best.update(gates, validation_loss()) else stale + 1
            progress.set_postfix(validation=f"{float(best.loss.mean()):.4f}")
            if stale >= patience:
                break
    best.restore(gates)
    with torch.no_grad():
        probabilities = torch.sigmoid(gates(valid_keys)).cpu()
    return gates.cpu(), probabilities, gate_report(probabilities, valid_labels.cpu(), data)


def gate_report(probabilities: torch.Tensor, labels: torch.Tensor, data: RetentionLabels) -> dict:
    """Per-head AUC, positive rate, confusion at thresholds 0.5 and 0.1, and reliability bins, on held-out tokens."""
    auc = auc_per_group(probabilities, labels)
    report = {"label": {"window": data.window, "threshold": data.threshold}, "heads": {}}
    bins = torch.linspace(0, 1, 11)
    for group in range(probabilities.shape[0]):
        p, y = probabilities[group], labels[group]
        confusion = {}
        for threshold in (0.5, 0.1):
            kept = p >= threshold
            confusion[str(threshold)] = {"tp": int((kept & y).sum()), "fp": int((kept & ~y).sum()), "fn": int((~kept & y).sum()), "tn": int((~kept & ~y).sum())}
        which = torch.bucketize(p, bins[1:-1])
        reliability = [
            {"predicted": float(p[which == b].mean()), "observed": float(y[which == b].float().mean()), "count": int((which == b).sum())}
            for b in range(10) if bool((which == b).any())
        ]
        report["heads"][f"{group // data.num_heads}/{group % data.num_heads}"] = {
            "auc": float(auc[group]), "positive_rate": float(y.float().mean()), "confusion": confusion, "reliability": reliability,
        }
    finite = auc[~auc.isnan()]
    report["median_auc"] = float(finite.median()) if len(finite) else float("nan")
    report["mean_positive_rate"] = float(labels.float().mean())
    return report
