"""The pretrained compressors that ship with kvcompress: complete Hub repositories, loadable by their Hub ids
with no Hub (offline, or a Hub that does not answer), listed and published through huggingface_hub, and
measured as their model cards say."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import greedy, prompt_ids, tiny_model
from huggingface_hub import ModelCard
from transformers import DynamicCache

import kvcompress
from kvcompress import ConfigError, GatedCache, KVSpliceCache, PCACache, SidecarCache, list_pretrained
from kvcompress.calibration.cli import main as cli
from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import streaming_perplexity
from kvcompress.hub import CONFIG_FILE, EVALUATION_FILE, WEIGHTS_FILE, shipped_repository

SHIPPED = {
    "kvcompress/smollm2-135m-instruct-sidecar-8x": SidecarCache,
    "kvcompress/smollm2-135m-instruct-gate": GatedCache,
    "kvcompress/smollm2-135m-instruct-pca-2x": PCACache,
    "kvcompress/smollm2-135m-instruct-kvsplice-2x": KVSpliceCache,
}

OFFLINE_LOADER = """
import sys
from kvcompress import GatedCache, KVSpliceCache, PCACache, SidecarCache
classes = {"gate": GatedCache, "pca": PCACache, "kvsplice": KVSpliceCache, "sidecar": SidecarCache}
for spec in sys.argv[1:]:
    method, repo_id = spec.split("=")
    for _ in range(2):  # a second load is the same shared artifact and says nothing more
        cache = classes[method].from_pretrained(repo_id)
    print(f"loaded {repo_id} as {type(cache).__name__} {cache.compressor.config['method']}")
try:
    PCACache.from_pretrained("kvcompress/no-such-compressor")
except FileNotFoundError as error:
    print(f"missing: {error}")
"""


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _run_loader(specs: list[str], env: dict, timeout: int = 300, proxies: bool = True) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and (proxies or k not in PROXY_VARIABLES)}
    environment |= {"HF_HUB_DISABLE_TELEMETRY": "1"} | env
    return subprocess.run([sys.executable, "-c", OFFLINE_LOADER, *specs], env=environment, capture_output=True, text=True, timeout=timeout)


def _method(repo_id: str) -> str:
    return json.loads((shipped_repository(repo_id) / CONFIG_FILE).read_text())["method"]


def test_exactly_the_four_repositories_ship_each_complete():
    listed = {item.repo_id: item for item in list_pretrained()}
    assert set(listed) == set(SHIPPED)
    for repo_id, cache_class in SHIPPED.items():
        item = listed[repo_id]
        assert item.cache_class == cache_class.__name__ and item.base_model == "SmolLM2-135M-Instruct"
        files = {file.name for file in item.path.iterdir()}
        assert {CONFIG_FILE, WEIGHTS_FILE, "README.md", EVALUATION_FILE} <= files
        config = json.loads((item.path / CONFIG_FILE).read_text())
        assert config["kvcompress_version"] == kvcompress.__version__
        assert config["calibration"]["command"].startswith(f"kvcompress calibrate --method {config['method']} ")
        assert "CC BY-SA 3.0" in config["calibration"]["data"]
        card = ModelCard.load(item.path / "README.md")
        assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.library_name == "kvcompress"
        assert f'{cache_class.__name__}.from_pretrained("{repo_id}"' in card.text
        assert config["calibration"]["command"] in card.text and "CC BY-SA 3.0" in card.text
        assert f"python benchmarks/pretrained.py --only {item.path.name}" in card.text  # how to reproduce its numbers
        evaluation = json.loads((item.path / EVALUATION_FILE).read_text())
        for name in ("compression_ratio", "perplexity", "passkey_1536", "passkey_6144", "multikey_1536"):
            assert item.evaluation[name] == pytest.approx(evaluation["row"][name], abs=1e-4)  # the card's model-index
        assert [row["cache"].split()[0] for row in evaluation["rows"]] == ["dense", config["method"], "streamingllm", "h2o"]
        assert item.load_options == evaluation["load_options"]  # what `kvcompress pretrained` says to load it with


def test_shipped_ids_load_offline_and_say_so_once():
    specs = [f"{_method(repo_id)}={repo_id}" for repo_id in SHIPPED]
    result = _run_loader(specs, {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for repo_id, cache_class in SHIPPED.items():
        assert f"loaded {repo_id} as {cache_class.__name__}" in result.stdout
        assert result.stderr.count(f"{repo_id}: HF_HUB_OFFLINE is set") == 1  # the log says so, once per id
    assert "missing: kvcompress/no-such-compressor is not a local directory" in result.stdout  # only shipped ids fall back


def test_a_hub_that_does_not_answer_falls_back_to_the_shipped_copy():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo_id = "kvcompress/smollm2-135m-instruct-pca-2x"
    result = _run_loader([f"pca={repo_id}"], {"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {repo_id} as PCACache" in result.stdout
    assert result.stderr.count(f"{repo_id}: the Hub did not answer") == 1  # the second load did not ask the Hub again


def test_without_network_the_shipped_copy_loads_without_the_hubs_retries():
    """A Hub host that does not resolve (no network; `.invalid` never resolves) is not asked: huggingface_hub would retry
    each request for about 23 s first."""
    repo_id = "kvcompress/smollm2-135m-instruct-gate"
    result = _run_loader([f"gate={repo_id}"], {"HF_ENDPOINT": "https://hub.invalid"}, proxies=False)  # a proxy would resolve it
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {repo_id} as GatedCache" in result.stdout
    assert f"{repo_id}: the Hub's host hub.invalid does not resolve (no network?)" in result.stderr and "Retrying" not in result.stderr
    assert "the Hub was not reachable (its host hub.invalid does not resolve)" in result.stdout  # another id fails at once, saying why


def test_behind_a_proxy_the_hub_is_asked_even_where_its_host_does_not_resolve_here(monkeypatch):
    """A proxy resolves the Hub's host itself: a name that does not resolve here says nothing about the network then."""
    from kvcompress import hub

    monkeypatch.setattr(hub.constants, "ENDPOINT", "https://hub.invalid")
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not hub._hub_host_resolves()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub._hub_host_resolves()


def test_a_pinned_revision_is_not_replaced_by_the_shipped_copy(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        PCACache.from_pretrained("kvcompress/smollm2-135m-instruct-pca-2x", revision="v0.0.1")


def test_force_download_where_the_hub_cannot_be_reached_says_why(monkeypatch):
    """The advice for a damaged download is force_download=True; where the Hub cannot be reached that names the reason,
    not huggingface_hub's clash with the local_files_only that kvcompress had added."""
    repo_id = "kvcompress/smollm2-135m-instruct-pca-2x"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    PCACache.from_pretrained(repo_id)  # the shipped copy, from now on used without asking the Hub again: unless forced
    with pytest.raises(FileNotFoundError, match="force_download=True downloads .* cannot be reached here: HF_HUB_OFFLINE is set"):
        PCACache.from_pretrained(repo_id, force_download=True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("kvcompress.hub._hub_host_resolves", lambda: False)
    with pytest.raises(FileNotFoundError, match="cannot be reached here: its host .* does not resolve"):
        PCACache.from_pretrained(repo_id, force_download=True)
    with pytest.raises(FileNotFoundError, match="cannot be reached here: local_files_only=True"):
        PCACache.from_pretrained(repo_id, force_download=True, local_files_only=True)


@pytest.mark.parametrize("repo_id", sorted(SHIPPED))
def test_shipped_compressor_refuses_another_model(repo_id, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cache = SHIPPED[repo_id].from_pretrained(repo_id)
    with pytest.raises(ValueError, match="fitted for SmolLM2-135M-Instruct .* Use a compressor fitted for this model"):
        greedy(tiny_model(), cache, prompt_ids(40), new_tokens=2)


def test_shipped_compressors_take_the_default_model_with_quantized_weights(monkeypatch):
    """torchao's int8 weights (TorchAoConfig) are tensor subclasses: the compressors' model check de-quantizes them (it
    failed inside torchao before). At settings that lose nothing each cache generates the quantized model's dense tokens."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # the shipped copies, without asking a Hub
    quantization = TorchAoConfig(Int8WeightOnlyConfig())
    model = kvcompress.enable(AutoModelForCausalLM.from_pretrained(kvcompress.models.default_model_path(), quantization_config=quantization, dtype=torch.float32))
    assert type(model.model.layers[0].self_attn.k_proj.weight).dequantize is not torch.Tensor.dequantize  # quantized, as torchao holds it
    ids = torch.tensor([model.config.bos_token_id or 1] + list(range(200, 300)))[None]
    dense = greedy(model, DynamicCache(), ids, new_tokens=8)
    for repo_id, cache_class in SHIPPED.items():
        assert torch.equal(greedy(model, cache_class.from_pretrained(repo_id, window=10000), ids, new_tokens=8), dense), repo_id


@pytest.mark.skipif(kvcompress.models.CACHE_ARGUMENT != "cache", reason="transformers < 5.24 knows only past_key_values=")
def test_generate_takes_the_cache_under_both_spellings():
    model, ids = tiny_model(), prompt_ids(60)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    current = model.generate(**kwargs, cache=kvcompress.H2OCache(budget=24))
    with pytest.warns(FutureWarning, match="past_key_values"):
        deprecated = model.generate(**kwargs, past_key_values=kvcompress.H2OCache(budget=24))
    dense = model.generate(**kwargs, cache=DynamicCache())
    assert torch.equal(current, deprecated)
    assert not torch.equal(current, dense)  # the compressed cache really was used


def test_cli_lists_and_dry_run_publishes_the_shipped_repositories(capsys, monkeypatch):
    cli(["pretrained"])
    listing = capsys.readouterr().out
    for repo_id, cache_class in SHIPPED.items():
        assert f"| {repo_id} | {cache_class.__name__} |" in listing
    # the gates' 7.8:1 is met with ratio=8 at the prompt's length; without options they keep their fitted default (about 4.8:1 there)
    assert "| kvcompress/smollm2-135m-instruct-gate | GatedCache | ratio=8, context=1536 |" in listing
    assert "| kvcompress/smollm2-135m-instruct-pca-2x | PCACache | - |" in listing
    assert "Load one with <cache>.from_pretrained(<Hub id>, <options>)" in listing
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", lambda *a, **k: pytest.fail("a dry run uploaded"))
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda *a, **k: pytest.fail("a dry run created a repo"))
    cli(["publish", "--dry-run", "--namespace", "someone"])
    plan = capsys.readouterr().out
    for repo_id in SHIPPED:
        assert f"-> https://huggingface.co/someone/{repo_id.split('/')[1]}" in plan
    assert "would publish 4 repositories (dry run: nothing was uploaded)" in plan


@pytest.mark.model
@pytest.mark.parametrize("repo_id", sorted(SHIPPED))
def test_shipped_compressor_reproduces_its_model_card(repo_id, default_model, monkeypatch):
    """Offline, by Hub id: the held-out streaming perplexity and held memory are what evaluation.json (the card) says."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    model, tokenizer = default_model
    evaluation = json.loads((shipped_repository(repo_id) / EVALUATION_FILE).read_text())
    cache = SHIPPED[repo_id].from_pretrained(repo_id, **evaluation["load_options"])
    ids = torch.tensor([tokenizer(heldout_text()).input_ids[: evaluation["settings"]["ppl_tokens"]]])
    result = streaming_perplexity(model, ids, cache)
    assert result.perplexity == pytest.approx(evaluation["row"]["perplexity"], rel=1e-3)
    dense = next(row for row in evaluation["rows"] if row["cache"] == "dense")
    assert result.perplexity < 1.25 * dense["scores"]["ppl"]
    assert result.nbytes < result.dense_nbytes
    out = model.generate(**tokenizer("The capital of France is", return_tensors="pt"), **kvcompress.cache_kwargs(SHIPPED[repo_id].from_pretrained(repo_id)), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 5


def test_load_cache_builds_the_cache_each_artifact_names(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for repo_id, cache_class in SHIPPED.items():
        cache = kvcompress.load_cache(repo_id)
        assert type(cache) is cache_class and cache.compressor.cache_class() is cache_class
    gate = kvcompress.load_cache("kvcompress/smollm2-135m-instruct-gate", ratio=8, context=1536)
    assert gate.keep_ratio == GatedCache.from_pretrained("kvcompress/smollm2-135m-instruct-gate", ratio=8, context=1536).keep_ratio
    local = tmp_path / "pca"
    shutil.copytree(shipped_repository("kvcompress/smollm2-135m-instruct-pca-2x"), local)
    assert type(kvcompress.load_cache(local, window=32)) is PCACache and kvcompress.load_cache(local, window=32).settings.window == 32
    config = json.loads((local / CONFIG_FILE).read_text()) | {"method": "telepathy"}
    (local / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'telepathy' compressor.*not a known kvcompress method.*import it first"):
        kvcompress.load_cache(local)
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-dir"):
        kvcompress.load_cache(tmp_path / "no-such-dir")


@pytest.mark.parametrize("name, says", [
    ("h2o", r"'h2o' names a cache, not a compressor: H2OCache needs no fitted weights; build it directly, e.g. kvcompress.H2OCache\(ratio=8\)"),
    ("StreamingLLM", r"'streamingllm' names a cache, not a compressor: StreamingLLMCache needs no fitted weights"),
    ("pca", r"'pca' names a method, not a compressor: PCACache.from_pretrained needs one fitted for your model, a directory made by "
            r"`kvcompress calibrate --method pca` or a Hub id \(for SmolLM2-135M-Instruct: kvcompress/smollm2-135m-instruct-pca-2x\)"),
    ("gate", r"GatedCache.from_pretrained needs one .* \(for SmolLM2-135M-Instruct: kvcompress/smollm2-135m-instruct-gate\)"),
])
def test_a_cache_or_method_name_given_as_a_compressor_says_what_to_pass(name, says, monkeypatch):
    """Neither is a directory nor a Hub id; without this the answer was that the Hub could not be reached."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=says):
        kvcompress.load_cache(name)


def test_a_mistyped_option_or_the_wrong_cache_class_says_what_would_do(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    gate, pca = "kvcompress/smollm2-135m-instruct-gate", "kvcompress/smollm2-135m-instruct-pca-2x"
    for load in (GatedCache.from_pretrained, kvcompress.load_cache):
        with pytest.raises(TypeError, match=r"GatedCache has no option 'ration'; its options: keep_ratio, ratio, context, policy"):
            load(gate, ration=8)
    with pytest.raises(TypeError, match=r"PCACache has no option 'keep_ratio'; its options: ratio, context, sink"):
        PCACache.from_pretrained(pca, keep_ratio=0.5)
    with pytest.raises(ConfigError, match=r"'pca' compressor, which GatedCache does not load: load it with PCACache.from_pretrained \(kvcompress.load_cache"):
        GatedCache.from_pretrained(pca)
    with pytest.raises(SystemExit, match="error: GatedCache has no option 'ration'; its options: keep_ratio, ratio"):
        cli(["generate", "--compressor", f"{gate}@ration=8"])  # before the model loads


def test_docs_table_regenerates_byte_for_byte_from_the_evaluation_files(tmp_path):
    """`benchmarks/pretrained.py --render --update-docs PAGE` rebuilds the table in docs/pretrained.md from the shipped evaluation.json files."""
    root = Path(__file__).parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    import pretrained as benchmark
    from doc_block import markers, update_block

    page = tmp_path / "pretrained.md"
    shutil.copy(root / "docs" / "pretrained.md", page)
    update_block(page, "pretrained", "stale")
    benchmark.main(["--render", "--update-docs", str(page)])
    text = page.read_text()
    assert text == (root / "docs" / "pretrained.md").read_text()
    start, end = markers("pretrained")
    block = text.split(start)[1].split(end)[0]
    for repo_id in SHIPPED:
        evaluation = json.loads((shipped_repository(repo_id) / EVALUATION_FILE).read_text())
        assert f"**{repo_id.split('/')[1]}**" in block and f"{evaluation['rows'][1]['measured_ratio']:.2f}:1" in block


def test_the_example_loads_any_shipped_id_and_shows_what_compression_loses(default_model):
    """examples/pretrained_compressor.py, as the README runs it: dense recalls the name, PCA at 1.84:1 does not."""
    example = Path(__file__).resolve().parents[1] / "examples" / "pretrained_compressor.py"
    run = subprocess.run(
        [sys.executable, str(example), "kvcompress/smollm2-135m-instruct-pca-2x"], capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "dense: The museum's new director is Ada Okafor." in run.stdout and "pca-2x: The museum's new director is **<unk>" in run.stdout
    assert "(1.84:1)" in run.stdout


def test_options_after_an_at_sign_say_to_pass_keywords_in_python(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"options after @ are the command line's way .* load_cache\('kvcompress/smollm2-135m-instruct-gate', ratio=8, context=1536\)"):
        kvcompress.load_cache("kvcompress/smollm2-135m-instruct-gate@ratio=8,context=1536")
    with pytest.raises(FileNotFoundError, match=r"pass keywords: ComposedCache.from_pretrained\(gate='my-gates', lowrank='my-pca'\)"):
        kvcompress.load_cache("compose@gate=my-gates,lowrank=my-pca")
    with pytest.raises(FileNotFoundError, match=r"is not a compressor directory \(none exists there\)"):  # a path, not options
        kvcompress.load_cache(str(tmp_path / "runs" / "lr=3e-4@step=100" / "gate"))
    named = tmp_path / "gates@ratio=8"  # a real directory of that name loads
    shutil.copytree(shipped_repository("kvcompress/smollm2-135m-instruct-gate"), named)
    assert type(kvcompress.load_cache(named)) is GatedCache
