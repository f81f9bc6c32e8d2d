"""Artifacts are untrusted input: tensor checks live in one place (CompressorArtifact.validate) and refuse what is wrong."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kvcompress
from kvcompress import ConfigError
from kvcompress.hub import CONFIG_FILE, WEIGHTS_FILE, shipped_repository

SHIPPED = ["kvcompress/smollm2-135m-instruct-gate", "kvcompress/smollm2-135m-instruct-pca-2x", "kvcompress/smollm2-135m-instruct-sidecar-8x"]


def _copy(repo_id, tmp_path):
    directory = tmp_path / repo_id.split("/")[1]
    shutil.copytree(shipped_repository(repo_id), directory)
    return directory


def _rewrite(directory, change):
    tensors = load_file(directory / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS_FILE))


@pytest.mark.parametrize("repo_id", SHIPPED)
def test_corrupt_weights_are_refused_with_the_tensor_named(repo_id, tmp_path):
    directory = _copy(repo_id, tmp_path)
    name = sorted(load_file(directory / WEIGHTS_FILE))[-1]

    def poison(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")

    _rewrite(directory, poison)
    with pytest.raises(ConfigError, match=rf"{name} holds NaN or infinite values"):
        kvcompress.load_cache(directory)

    directory = _copy(repo_id, tmp_path / "ints")
    _rewrite(directory, lambda tensors: tensors.__setitem__(name, tensors[name].to(torch.int32)))
    with pytest.raises(ConfigError, match=rf"{name} holds torch.int32, not floating-point"):
        kvcompress.load_cache(directory)

    directory = _copy(repo_id, tmp_path / "missing")
    _rewrite(directory, lambda tensors: tensors.pop(name))
    with pytest.raises(ConfigError, match=rf"lacks tensor {name}"):
        kvcompress.load_cache(directory)


@pytest.mark.parametrize("repo_id", SHIPPED)
def test_a_config_without_its_base_model_is_refused_clearly(repo_id, tmp_path):
    directory = _copy(repo_id, tmp_path)
    config = json.loads((directory / CONFIG_FILE).read_text())
    del config["base_model"]["head_dim"]
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="config|base model"):
        kvcompress.load_cache(directory)
