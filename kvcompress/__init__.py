"""kvcompress: KV-cache compression for HuggingFace causal LMs, as plain `transformers.Cache` objects.

    model, tokenizer = kvcompress.load_model()            # or kvcompress.enable(your_model)
    cache = kvcompress.H2OCache(ratio=8)                  # or PCACache.from_pretrained("dir-or-hub-id"), ComposedCache..., ...
    compressor, report = kvcompress.calibrate(model, tokenizer, "pca", rank=16)    # fit one for your model
    model.generate(**inputs, cache=cache, max_new_tokens=64)       # transformers < 5.24: past_key_values=cache
"""

from .attention import AttentionNotEnabledError, enable
from .baselines import H2OCache, StreamingLLMCache
from .cache import CompressedCache, CompressedLayer
from .composed import ComposedCache
from .config import ConfigError, RankConfig
from .gate import GateCompressor, GatedCache
from .hub import PretrainedCompressor, list_pretrained, load_cache, publish_pretrained
from .lowrank import KVSpliceCache, KVSpliceCompressor, PCACache, PCACompressor
from .models import cache_kwargs, load_model
from .policies import Encoding, KeepPolicy, LayerView
from .settings import Budget, CacheSettings
from .sidecar import SidecarCache, SidecarCompressor
from .slots import Slots

__version__ = "0.1.0"


def __getattr__(name: str):
    """`kvcompress.calibrate` (fit a compressor from Python, as `kvcompress calibrate` does) loads the calibration code on first use."""
    if name == "calibrate":
        from .calibration.cli import calibrate

        return calibrate
    raise AttributeError(f"module 'kvcompress' has no attribute {name!r}")

__all__ = [
    "AttentionNotEnabledError",
    "Budget",
    "CacheSettings",
    "ComposedCache",
    "CompressedCache",
    "CompressedLayer",
    "ConfigError",
    "Encoding",
    "GateCompressor",
    "GatedCache",
    "H2OCache",
    "KVSpliceCache",
    "KeepPolicy",
    "LayerView",
    "KVSpliceCompressor",
    "PCACache",
    "PCACompressor",
    "RankConfig",
    "SidecarCache",
    "SidecarCompressor",
    "Slots",
    "StreamingLLMCache",
    "PretrainedCompressor",
    "cache_kwargs",
    "calibrate",
    "enable",
    "list_pretrained",
    "load_cache",
    "load_model",
    "publish_pretrained",
]
