"""Artifacts are untrusted input: tensor checks live in one place (CompressorArtifact.validate) and refuse what is wrong.
The registry of methods: every artifact class that sets `method` registers itself and names its cache."""

import json
import os
import random
import shutil
import sys

import pytest
import torch
from conftest import reseal
from safetensors.torch import load_file, save_file

import kvcompress
from kvcompress import ConfigError, hub
from kvcompress.hub import CONFIG_FILE, WEIGHTS_FILE, artifact_class, known_methods, shipped_repository
from kvcompress.lowrank import LowRankCompressor, PCACompressor, _LowRankCache

SHIPPED = ["kvcompress/smollm2-135m-instruct-gate", "kvcompress/smollm2-135m-instruct-pca-2x", "kvcompress/smollm2-135m-instruct-sidecar-8x"]


def _copy(repo_id, tmp_path):
    directory = tmp_path / repo_id.split("/")[1]
    shutil.copytree(shipped_repository(repo_id), directory)
    return directory


def _rewrite(directory, change):
    """Change the tensors and seal the artifact again: one written consistently, with wrong contents."""
    tensors = load_file(directory / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    reseal(directory)


@pytest.mark.parametrize("repo_id", SHIPPED)
@pytest.mark.parametrize("damage", ["random bytes over the data", "truncated", "an extra tensor"])
def test_weights_that_do_not_match_their_checksum_are_refused(repo_id, damage, tmp_path):
    """Random bytes over the data, header intact, can be finite numbers: only the checksum tells them from the fitted ones."""
    directory = _copy(repo_id, tmp_path)
    weights = directory / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    if damage == "random bytes over the data":
        data[-64:-32] = random.Random(0).randbytes(32)
    elif damage == "truncated":
        del data[len(data) // 2 :]
    else:
        save_file(load_file(weights) | {"extra": torch.zeros(2)}, str(weights))
        data = weights.read_bytes()
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"does not match the checksum in its {CONFIG_FILE} .* a file is corrupt, truncated, edited.*From the Hub: download it again .*calibrate it anew"):
        kvcompress.load_cache(directory)


def test_an_edited_config_is_refused(tmp_path):
    """A field that shapes no tensor (the sidecar's attention heads) would otherwise build another network silently."""
    directory = _copy(SHIPPED[2], tmp_path)
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["sidecar"]["attention_heads"] = 8
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="does not match the checksum"):
        kvcompress.load_cache(directory)


def test_an_undeclared_tensor_is_refused(tmp_path):
    directory = _copy(SHIPPED[0], tmp_path)
    _rewrite(directory, lambda tensors: tensors.__setitem__("extra", torch.zeros(2)))
    with pytest.raises(ConfigError, match=r"holds tensor\(s\) its config does not declare \(extra\.\.\.\)"):
        kvcompress.load_cache(directory)


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
    reseal(directory, config)
    with pytest.raises(ConfigError, match="compressor_config.json: the field 'head_dim' in base_model is missing"):
        kvcompress.load_cache(directory)


@pytest.mark.parametrize("repo_id", SHIPPED)
def test_a_tensor_of_the_wrong_shape_is_refused_with_its_name(repo_id, tmp_path):
    directory = _copy(repo_id, tmp_path)
    name = sorted(load_file(directory / WEIGHTS_FILE))[0]
    _rewrite(directory, lambda tensors: tensors.__setitem__(name, torch.cat([tensors[name], tensors[name]])))
    with pytest.raises(ConfigError, match=rf"{name} is \(.*\), its config says \("):
        kvcompress.load_cache(directory)


def test_the_registry_knows_every_method_and_its_cache():
    assert known_methods() == ["gate", "kvsplice", "pca", "sidecar"]
    assert known_methods(LowRankCompressor) == ["kvsplice", "pca"]
    assert {method: artifact_class(method).cache_class() for method in known_methods()} == {
        "gate": kvcompress.GatedCache, "kvsplice": kvcompress.KVSpliceCache, "pca": kvcompress.PCACache, "sidecar": kvcompress.SidecarCache,
    }
    assert artifact_class("telepathy") is None and artifact_class(None) is None
    with pytest.raises(TypeError, match="'pca' is already kvcompress.lowrank.PCACompressor's"):
        type("OtherPCA", (LowRankCompressor,), {"method": "pca"})


def test_a_new_artifact_class_registers_and_loads_as_its_cache(tmp_path, monkeypatch):
    """A method outside kvcompress: setting `method` registers the class, and load_cache builds the cache its module names."""
    monkeypatch.setattr(hub, "_METHODS", dict(hub._METHODS))  # registered for this test only

    class ReversedPCACompressor(PCACompressor):
        method, cache_class_name = "reversed-pca", "ReversedPCACache"

    class ReversedPCACache(_LowRankCache):
        compressor_class = ReversedPCACompressor

    monkeypatch.setattr(sys.modules[__name__], "ReversedPCACache", ReversedPCACache, raising=False)
    directory = _copy("kvcompress/smollm2-135m-instruct-pca-2x", tmp_path)
    reseal(directory, json.loads((directory / CONFIG_FILE).read_text()) | {"method": "reversed-pca"})
    assert artifact_class("reversed-pca") is ReversedPCACompressor and "reversed-pca" in known_methods(LowRankCompressor)
    assert type(kvcompress.load_cache(directory)) is ReversedPCACache
    assert type(LowRankCompressor.from_pretrained(directory)) is ReversedPCACompressor


def test_saving_other_weights_over_a_compressor_replaces_it_and_removes_its_reports(tmp_path, caplog):
    """save_pretrained overwrites, as transformers' does, but says so, and the old compressor's reports go with it: left
    beside new weights (and pushed with them) they would describe a compressor that is no longer there."""
    directory = _copy("kvcompress/smollm2-135m-instruct-gate", tmp_path)
    (directory / "notes.txt").write_text("the user's own file")
    reports = sorted(name for name in hub.REPORT_FILES if (directory / name).is_file())
    assert {"calibration_results.json", "evaluation.json", "gate_report.json"} <= set(reports)
    with caplog.at_level("WARNING", logger="kvcompress"):
        hub.CompressorArtifact.from_pretrained(directory).save_pretrained(directory)  # the same weights (a card refreshed): nothing goes
    assert all((directory / name).is_file() for name in reports) and not caplog.records
    saved = (directory / CONFIG_FILE).stat().st_mtime_ns
    new_plot = directory / "gate_report.png"  # a plot made since (calibrate(plot=...) before save_pretrained): it stays
    new_plot.write_bytes(b"the new compressor's plot")
    os.utime(new_plot, ns=(saved + 10**9, saved + 10**9))
    reports.remove("gate_report.png")
    pca = PCACompressor.from_pretrained(shipped_repository("kvcompress/smollm2-135m-instruct-pca-2x"))
    with caplog.at_level("WARNING", logger="kvcompress"):
        pca.save_pretrained(directory)
    assert [record.getMessage() for record in caplog.records] == [
        f"{directory}/ held another compressor (gate), now replaced by this pca one; its reports are removed ({', '.join(reports)}), since they describe the old weights."
    ]
    assert not any((directory / name).exists() for name in reports) and (directory / "notes.txt").is_file() and new_plot.is_file()
    assert type(kvcompress.load_cache(directory)) is kvcompress.PCACache
