"""Artifacts are untrusted input: whatever is done to a compressor's config or weights (truncation, random bytes, NaN,
wrong dtypes and shapes, huge declared sizes, extra and missing keys, a future format version), loading it either refuses
with a `ConfigError` that says what is wrong, or gives a cache that runs. Never a crash, a hang, or a cache other than the
one its (sealed) files describe.

KVCOMPRESS_PROPERTY_EXAMPLES sets how many corruptions are tried (CI: the default; locally e.g. 1000).
"""

import json
import os
import random
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import greedy, prompt_ids, reseal, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_gates import tiny_gates
from test_lowrank import fitted
from test_sidecar import untrained_sidecar

import kvcompress
from kvcompress import ConfigError
from kvcompress.hub import CONFIG_FILE, WEIGHTS_FILE

EXAMPLES = int(os.environ.get("KVCOMPRESS_PROPERTY_EXAMPLES", "60"))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
DTYPES = [torch.int32, torch.int8, torch.bool, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny Llama and a saved artifact of each kind fitted for it."""
    model = tiny_model("llama")
    made = {"gate": tiny_gates(model), "pca": fitted(model, 6), "sidecar": untrained_sidecar(model)}
    root = tmp_path_factory.mktemp("artifacts")
    for name, artifact in made.items():
        artifact.save_pretrained(root / name)
    return model, root


@st.composite
def config_damage(draw, config: dict):
    """A path into the config and what to do there: delete it, replace it with any JSON value, or add an unknown key."""
    path, node = [], config
    while isinstance(node, dict) and node and (not path or draw(st.booleans())):
        key = draw(st.sampled_from(sorted(node)))
        path.append(key)
        node = node[key]
    return path, draw(st.sampled_from(["delete", "replace", "extra key"])), draw(JSON)


def damage_config(directory: Path, path: list, action: str, value) -> None:
    config = json.loads((directory / CONFIG_FILE).read_text())
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    elif action == "replace":
        parent[path[-1]] = value
    else:
        (parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent)["unknown_field"] = value
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def damage_weights(directory: Path, action: str, rng: random.Random) -> None:
    file = directory / WEIGHTS_FILE
    if action in ("truncate", "random bytes"):
        data = bytearray(file.read_bytes())
        start = rng.randrange(len(data))
        if action == "truncate":
            del data[start:]
        else:
            data[start : start + 16] = rng.randbytes(16)
        file.write_bytes(bytes(data))
        return
    tensors = load_file(file)
    name = rng.choice(sorted(tensors))
    tensor = tensors[name].clone()
    if action == "nan":
        tensor.view(-1)[rng.randrange(tensor.numel())] = float(rng.choice(["nan", "inf"]))
    elif action == "dtype":
        tensor = tensor.to(rng.choice(DTYPES))
    elif action == "shape":
        tensor = torch.cat([tensor.flatten(), tensor.flatten()[:1]]) if rng.random() < 0.5 else tensor[None]
    elif action == "drop":
        tensor = None
    else:  # an extra tensor
        tensors["unknown.tensor"] = torch.zeros(3)
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    save_file(tensors, str(file))


@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=30), suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_damaged_artifact_is_refused_clearly_or_runs(artifacts, data):
    model, root = artifacts
    kind = data.draw(st.sampled_from(["gate", "pca", "sidecar"]))
    target = data.draw(st.sampled_from(["config", "config text", "weights"]))
    sealed = data.draw(st.booleans())  # seal the damage with a fresh checksum, so it reaches the schema and the tensor checks
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary) / kind
        shutil.copytree(root / kind, directory)
        if target == "config":
            if data.draw(st.booleans()):
                path, action, value = data.draw(config_damage(json.loads((directory / CONFIG_FILE).read_text())))
                damage_config(directory, path, action, value)
            else:
                damage_config(directory, ["format_version"], "replace", data.draw(st.integers(2, 10**9)))
        elif target == "config text":
            text = (directory / CONFIG_FILE).read_bytes()
            cut = data.draw(st.integers(0, len(text) - 1))
            (directory / CONFIG_FILE).write_bytes(text[:cut] + data.draw(st.binary(max_size=8)))
        else:
            action = data.draw(st.sampled_from(["truncate", "random bytes", "nan", "dtype", "shape", "drop", "extra tensor"]))
            damage_weights(directory, action, random.Random(data.draw(st.integers(0, 2**32))))
        if sealed and target != "config text":
            try:
                reseal(directory)
            except (json.JSONDecodeError, OSError, AttributeError, TypeError):
                pass  # nothing to seal (the config is no JSON object): it must still be refused
        try:
            cache = kvcompress.load_cache(directory)
        except ConfigError as error:
            assert len(str(error)) > 20
            return
        assert sealed, "an unsealed change was loaded: the checksum must refuse it"
        try:
            greedy(model, cache, prompt_ids(40), new_tokens=3)
        except ValueError as error:  # a sealed fingerprint or shape that no longer matches the model
            assert "fitted for" in str(error), str(error)
