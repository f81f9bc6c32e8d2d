"""Every supported architecture (conftest's tiny models: dense, mixture-of-experts, q/k-normed) under every cache: what is
lossless equals DynamicCache token for token, and what compresses holds fewer bytes than dense and generates.

The baselines and full-rank PCA are checked per architecture in test_cache and test_lowrank; this file adds the fitted
methods that calibrate on the model itself (gates, the sidecar, their composition with low rank), so that a newly listed
architecture is calibrated and decoded by each of them before the README names it.
"""

import pytest
import torch
from conftest import ARCHITECTURES, greedy, prompt_ids, tiny_model
from test_gates import tiny_gates
from test_lowrank import fitted
from test_sidecar import untrained_sidecar
from transformers import DynamicCache
from transformers.models.glm4 import Glm4Config, Glm4ForCausalLM
from transformers.models.phi3 import Phi3Config, Phi3ForCausalLM

import kvcompress
from kvcompress import ComposedCache, GatedCache, H2OCache, SidecarCache


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def fitted_model(request):
    model = tiny_model(request.param)
    return model, tiny_gates(model), fitted(model, 16)


def test_every_fitted_cache_at_a_lossless_setting_generates_what_dense_generates(fitted_model):
    model, gates, pca = fitted_model
    ids = prompt_ids(40)
    dense = greedy(model, DynamicCache(), ids)
    lossless = {
        "gates keeping every token": GatedCache(gates, 1.0),
        "one super-token per token": SidecarCache(untrained_sidecar(model, 8, 8)),
        "gates x full-rank PCA, floats": ComposedCache(gates, pca, keep_ratio=1.0, bits=None),
    }
    for name, cache in lossless.items():
        assert torch.equal(greedy(model, cache, ids), dense), name
        assert cache.layers[0].store_length > 0, name  # tokens really left the window into the store


def test_every_fitted_cache_that_compresses_holds_fewer_bytes_and_generates(fitted_model):
    model, gates, pca = fitted_model
    ids = prompt_ids(80)
    compressing = {
        "gates": GatedCache(gates, 0.2),
        "sidecar 8:2": SidecarCache(untrained_sidecar(model, 8, 2)),
        "keep-and-merge": SidecarCache(untrained_sidecar(model, 8, 2).with_gates(gates), keep_ratio=0.2),
        "gates x PCA x int4": ComposedCache(gates, pca, keep_ratio=0.5, bits=4, group_size=8),
        "h2o": H2OCache(budget=24),
    }
    for name, cache in compressing.items():
        assert greedy(model, cache, ids, new_tokens=16).shape == (1, 16), name
        assert cache.get_seq_length() == 80 + 16 - 1, name
        assert cache.nbytes() < cache.dense_nbytes(), name


@pytest.mark.parametrize(
    "config_class, model_class, why",
    [(Phi3Config, Phi3ForCausalLM, "phi3"), (Glm4Config, Glm4ForCausalLM, "glm4")],  # fused projections; RoPE on interleaved pairs
)
def test_a_decoder_whose_attention_is_not_llamas_is_refused_by_name(config_class, model_class, why):
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    with pytest.raises(ValueError, match=f"this model is '{why}'. Use one of the supported architectures"):
        kvcompress.enable(model_class(config))
