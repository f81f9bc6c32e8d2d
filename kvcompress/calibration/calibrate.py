"""The calibration pipeline: collect from a corpus, fit a compressor, measure it on held-out text.

    calibration = LowRankCalibration.collect(model, tokenizer, fisher_sequences=8)  # samples and Fisher information
    layers, kv_heads, head_dim = kv_shape(model.config)
    full = RankConfig.uniform(layers, kv_heads, head_dim, head_dim, head_dim)        # every head, at full rank
    ranks, source = calibration.ranks(full, target_memory_reduction=0.5)             # Fisher-guided ranks
    compressor, fit_metrics = calibration.fit("pca", ranks, {"sink": 4, "window": 64, "block_size": 16})
    report = calibration.measure(compressor, fit_metrics, source, seconds=0.0)
    compressor.save_pretrained("smollm2-pca")          # or .push_to_hub("user/smollm2-pca")
    print(report.summary())

`kvcompress calibrate` (`kvcompress.calibration.cli`) runs this for pca and kvsplice, and its
counterparts for gates and the sidecar.

Everything the summary prints is measured in the run: perplexity of the dense cache and of the
compressed one on the corpus' held-out part (never seen by the fit), the memory both held there,
and the wall-clock time of the calibration.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from kvcompress.config import RankConfig
from kvcompress.corpus import DEFAULT_CORPUS_NAME, HOLDOUT_FRACTION, load_text, split_text
from kvcompress.evaluation.harness import streaming_perplexity
from kvcompress.hub import artifact_class, known_methods, model_signature
from kvcompress.lowrank import LowRankCompressor
from kvcompress.models import check_token_ids
from kvcompress.rope import rope_inv_freq

from .collect import SAMPLE_SEQUENCE, collect_attention_samples
from .lowrank import KVData, Spectrum, fisher_information, fisher_ranks, fit_kvsplice, group_ranks, pca_heads


@dataclass
class CalibrationReport:
    """What a calibration measured; `summary()` is the readable form."""

    method: str
    setting: str  # what was fitted, in words (ranks, keep ratio, ...)
    baseline_perplexity: float
    perplexity: float
    nbytes: int
    dense_nbytes: int
    eval_tokens: int
    seconds: float
    fit_metrics: dict = field(default_factory=dict)
    peak_memory: dict = field(default_factory=dict)  # `peak_memory()` of the calibration, where it was taken
    reports: dict = field(default_factory=dict)  # the method's further reports, file name -> content (the command writes them beside the artifact)

    @property
    def degradation(self) -> float:
        return self.perplexity / self.baseline_perplexity - 1

    @property
    def memory_savings(self) -> float:
        return 1 - self.nbytes / self.dense_nbytes

    def metrics(self) -> dict:
        return {
            "baseline_perplexity": self.baseline_perplexity,
            "perplexity": self.perplexity,
            "perplexity_degradation": self.degradation,
            "measured_memory_savings": self.memory_savings,
            "eval_tokens": self.eval_tokens,
            "calibration_seconds": self.seconds,
        } | self.peak_memory | self.fit_metrics

    def summary(self) -> str:
        lines = [
            f"Method:                 {self.method} ({self.setting})",
            f"Baseline perplexity:    {self.baseline_perplexity:.2f}",
            f"Compressed perplexity:  {self.perplexity:.2f}",
            f"Perplexity degradation: {100 * self.degradation:+.2f}%",
            f"Memory savings:         {100 * self.memory_savings:.1f}% measured at {self.eval_tokens} tokens (sink and recent window included)"
            + ("; nothing saved: at so few tokens the exact sink and window (and their room to grow) may still hold them all (measure "
               "with more eval_tokens: --eval-tokens on the command line), or the setting compresses nothing" if self.memory_savings <= 0 else ""),
            f"Calibration time:       {self.seconds:.1f}s (load, collection, fit; the checks above not included)",
        ]
        if self.peak_memory:
            gpu = self.peak_memory.get("peak_gpu_memory_bytes")
            lines.append(f"Peak memory:            {self.peak_memory['peak_host_memory_bytes'] / 2**30:.2f} GiB host (resident)"
                         + (f", {gpu / 2**30:.2f} GiB GPU (torch allocator, all GPUs)" if gpu is not None else ""))
        for name, value in self.fit_metrics.items():
            lines.append(f"  {name}: {value:.4g}" if isinstance(value, float) else f"  {name}: {value}")
        return "\n".join(lines)


def peak_memory() -> dict:
    """The most memory this process has held so far: host (resident set) and, where there are GPUs, the torch allocator's on all of them."""
    import resource  # Unix; ru_maxrss is in KiB on Linux, bytes on macOS

    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_host_memory_bytes": resident if sys.platform == "darwin" else resident * 1024}
    if torch.cuda.is_available():
        peak["peak_gpu_memory_bytes"] = sum(torch.cuda.max_memory_allocated(index) for index in range(torch.cuda.device_count()))
    return peak


def calibration_corpus(model, tokenizer, data: str | None, eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(calibration token stream, held-out evaluation ids ``[1, eval_tokens]``, the corpus' name) of a corpus
    (file or datasets name; None: the shipped WikiText-2) for `model`."""
    calibration_text, heldout = split_text(load_text(data))
    heldout_ids = tokenizer(heldout).input_ids[:eval_tokens]
    check_token_ids(model, tokenizer, heldout_ids)
    heldout_ids = torch.tensor([heldout_ids])
    if heldout_ids.shape[1] < eval_tokens:
        raise ValueError(
            f"The held-out part of the corpus (its last {HOLDOUT_FRACTION:.0%}) has {heldout_ids.shape[1]} tokens; evaluation needs {eval_tokens}. "
            f"Give more text (about {eval_tokens / HOLDOUT_FRACTION:,.0f} tokens in all), or evaluate on fewer tokens (eval_tokens; on the command line --eval-tokens)."
        )
    return torch.tensor(tokenizer(calibration_text).input_ids), heldout_ids, data or f"{DEFAULT_CORPUS_NAME}, calibration part"


def measure(model, heldout_ids: torch.Tensor, compressor, cache, setting: str, seconds: float, fit_metrics: dict, baseline: float | None = None) -> CalibrationReport:
    """Streaming perplexity and memory of `cache` on held-out tokens against the dense cache (unless `baseline` is given).

    The report's metrics are also recorded in the compressor's config (its model card shows them).
    """
    from transformers import DynamicCache

    if baseline is None:
        baseline = streaming_perplexity(model, heldout_ids, DynamicCache()).perplexity
    result = streaming_perplexity(model, heldout_ids, cache)
    report = CalibrationReport(
        compressor.method, setting, baseline, result.perplexity, result.nbytes, result.dense_nbytes, heldout_ids.shape[1], seconds, fit_metrics,
    )
    compressor.config["metrics"] = report.metrics()
    return report


@dataclass
class LowRankCalibration:
    """The expensive, reusable part of a calibration: samples, spectra and (when asked) Fisher information."""

    model: object
    data: KVData
    inv_freq: torch.Tensor
    key_spectrum: Spectrum
    value_spectrum: Spectrum
    signature: dict
    calibration: dict
    heldout_ids: torch.Tensor
    fisher: object = None
    seconds: float = 0.0

    @classmethod
    def collect(cls, model, tokenizer, data: str | None = None, eval_tokens: int = 1024, **kwargs) -> LowRankCalibration:
        """Tokenize a corpus (file or datasets name; None: the shipped WikiText-2) and collect from its calibration part."""
        token_ids, heldout_ids, data_name = calibration_corpus(model, tokenizer, data, eval_tokens)
        return cls.from_token_ids(model, token_ids, heldout_ids, data_name=data_name, **kwargs)

    @classmethod
    def from_token_ids(
        cls, model, token_ids: torch.Tensor, heldout_ids: torch.Tensor, samples: int = 4096, tokens: int = 16384, sink: int = 4,
        sequence_length: int = SAMPLE_SEQUENCE, fisher_sequences: int = 0, fisher_sequence_length: int = 512,
        name_or_path: str | None = None, data_name: str | None = None, seed: int = 0,
    ) -> LowRankCalibration:
        """Collect samples (and Fisher information when `fisher_sequences`) from a 1-D token stream."""
        started = time.perf_counter()
        inv_freq = rope_inv_freq(model)
        samples_ = collect_attention_samples(model, token_ids, samples=samples, max_tokens=tokens, sequence_length=sequence_length, seed=seed)
        kv = KVData.from_samples(samples_, inv_freq, sink)
        fisher = None
        if fisher_sequences:
            fisher = fisher_information(model, token_ids, inv_freq, sequences=fisher_sequences, sequence_length=fisher_sequence_length, sink=sink)
        return cls(
            model, kv, inv_freq, Spectrum.of(kv.keys), Spectrum.of(kv.values), model_signature(model, name_or_path),
            {"data": data_name, "tokens": samples_.tokens_seen, "samples_per_head": samples, "sink_excluded": sink, "seed": seed},
            heldout_ids.to(model.device), fisher, time.perf_counter() - started,
        )

    def ranks(self, template: RankConfig, target_memory_reduction: float | None = None) -> tuple[RankConfig, str]:
        """`template` as it is, or Fisher-guided ranks meeting a memory target."""
        if target_memory_reduction is None:
            return template, "given"
        if self.fisher is None:
            raise ValueError("Fisher-guided ranks need Fisher information: collect with fisher_sequences > 0.")
        return fisher_ranks(self.fisher, self.key_spectrum, self.value_spectrum, template, target_memory_reduction), "fisher"

    def fit(self, method: str, ranks: RankConfig, cache_settings: dict, kvsplice_steps: int = 300, seed: int = 0):
        """A compressor of `method` at `ranks` and its fit metrics (`seed`: KVSplice's training batches)."""
        if method not in known_methods(LowRankCompressor):
            raise ValueError(f"Unknown low-rank method {method!r}; choose from {', '.join(known_methods(LowRankCompressor))}.")
        key_ranks, value_ranks, exact = group_ranks(ranks)
        metrics = {}
        if method == "kvsplice":
            key_heads, value_heads, metrics = fit_kvsplice(self.data, ranks, self.inv_freq, steps=kvsplice_steps, seed=seed, device=self.model.device)
        else:
            key_heads, value_heads = pca_heads(self.key_spectrum, key_ranks, exact), pca_heads(self.value_spectrum, value_ranks, exact)
        config = {"base_model": self.signature, "cache": cache_settings, "ranks": ranks.to_json(), "calibration": self.calibration}
        return artifact_class(method).from_heads(key_heads, value_heads, self.inv_freq, config), metrics

    def measure(self, compressor, fit_metrics: dict, rank_source: str, seconds: float, baseline: float | None = None) -> CalibrationReport:
        """Perplexity and memory of the compressor on the held-out tokens (and of the dense cache unless given)."""
        fraction = compressor.ranks.memory_fraction()
        setting = f"ranks: {rank_source}; the compressed store keeps {100 * fraction:.1f}% of dense K/V"
        cache = compressor.cache_class()(compressor)
        return measure(self.model, self.heldout_ids, compressor, cache, setting, seconds, {"rank_memory_fraction": fraction} | fit_metrics, baseline)
