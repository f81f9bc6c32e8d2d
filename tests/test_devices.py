"""Where and in what precision models load and calibrate: `load_model(device=, dtype=)` and the commands' --device and
--dtype. Every method calibrates a small random Llama in bfloat16 on the CPU into a float32 artifact whose quality is that
of the float32 calibration; a device that is not there, or a dtype that does not exist, is refused before any work.
(On a GPU the same commands run with --device cuda; docs/calibration.md has the measured times.)"""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import kvcompress
from kvcompress.calibration.cli import main
from kvcompress.hub import PRETRAINED_DIR
from kvcompress.models import check_device, check_dtype, default_model_path

QUICK = {  # each method at a size that calibrates in seconds on two cores
    "pca": ["--rank", "8", "--samples", "256", "--tokens", "2048"],
    "kvsplice": ["--target-memory-reduction", "0.5", "--samples", "256", "--tokens", "4096", "--fisher-sequences", "2", "--kvsplice-steps", "10"],
    "gate": ["--gate-tokens", "4096", "--gate-steps", "20", "--recall-facts", "2", "--keep-ratio", "0.25"],
    "sidecar": ["--trajectory-sequences", "2", "--heldout-sequences", "1", "--query-positions", "32", "--sidecar-steps", "4"],
}


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A random Llama (3 layers, 2 KV heads of 32 dims) saved in float32 with the default model's tokenizer: a model a user brings."""
    directory = tmp_path_factory.mktemp("small-llama")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.1, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_models_load_in_the_dtype_and_on_the_device_asked_for(small_model_dir, tmp_path):
    model, _ = kvcompress.load_model(small_model_dir, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert kvcompress.load_model(small_model_dir)[0].dtype == torch.float32  # auto: the model's own
    half, tokenizer = kvcompress.load_model(small_model_dir, dtype=torch.bfloat16)
    half.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert kvcompress.load_model(tmp_path)[0].dtype == torch.bfloat16  # auto follows what the config names
    spread, _ = kvcompress.load_model(small_model_dir, device="auto")  # accelerate's device_map; without a GPU everything lands on the CPU
    assert {parameter.device.type for parameter in spread.parameters()} == {"cpu"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_that_is_not_there_is_refused():
    with pytest.raises(ValueError, match="torch finds no CUDA GPU here .*use cpu"):
        check_device("cuda")
    assert check_device(None) == "cpu"


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:x", 3])
def test_unknown_devices_are_refused(device):
    if device == 3 and torch.cuda.device_count() > 3:
        pytest.skip("device 3 is GPU 3 on this machine")
    with pytest.raises(ValueError, match=r"give cpu, cuda, cuda:N or auto|there are \d+ CUDA GPUs|torch finds no CUDA GPU here"):  # 3: GPU 3 (a CUDA build of torch)
        check_device(device)


@pytest.mark.parametrize("dtype", ["int8", "float64", torch.float64, "fp16"])
def test_unknown_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match="choose auto .*float32, bfloat16, float16"):
        check_dtype(dtype)


@pytest.mark.parametrize("command", ["generate", "evaluate", "calibrate"])
def test_every_command_refuses_a_bad_device_or_dtype_before_any_work(command, capsys, tmp_path):
    extra = ["--method", "pca", "--rank", "8", "--output", str(tmp_path / "out")] if command == "calibrate" else []
    for flag, value, message in (("--device", "tpu", "Unknown device 'tpu'"), ("--dtype", "int8", "invalid choice: 'int8'")):
        with pytest.raises(SystemExit) as exit_:
            main([command, *extra, flag, value])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _calibrate(model_dir, method: str, output, *options: str) -> dict:
    main(["calibrate", "--model", str(model_dir), "--method", method, "--eval-tokens", "256", "--output", str(output), *QUICK[method], *options])
    return json.loads((output / "calibration_results.json").read_text())


def _subspace_overlap(directory_a, directory_b) -> float:
    """Mean over heads of how much of one PCA artifact's key/value subspace the other's holds (1: the same subspaces)."""
    a, b = (kvcompress.hub.CompressorArtifact.from_pretrained(directory).tensors for directory in (directory_a, directory_b))
    overlaps = [float((a[name] @ b[name].T).square().sum() / a[name].shape[0]) for name in a if name.endswith(".decoder")]
    return sum(overlaps) / len(overlaps)


AGREE = {  # per method: its fit's own numbers, which bfloat16 must reproduce (beside the held-out check)
    "pca": {},
    "kvsplice": {"validation_attention_error_pca": 0.05, "validation_reconstruction_error_pca": 0.02},
    "gate": {"mean_positive_rate": 0.01, "recall_statement_positive_rate": 0.02, "median_auc": 0.02},
    "sidecar": {"heldout_output_error_attention_matching": 0.01, "heldout_output_error": 0.01, "heldout_key_norm_ratio": 0.02, "heldout_value_norm_ratio": 0.02},
}


@pytest.mark.parametrize("method", list(QUICK))
def test_every_method_calibrates_in_bfloat16_to_the_numbers_of_float32(method, small_model_dir, tmp_path, capsys):
    """bfloat16 collection with float32 statistics fits what float32 fits: the labels, spectra, attention errors and
    held-out degradation agree within rounding, and the artifact is float32."""
    extra = ["--trajectories", str(tmp_path / "trajectories-{}")] if method == "sidecar" else []
    full = _calibrate(small_model_dir, method, tmp_path / "float32", "--device", "cpu", "--dtype", "float32", *[e.format("float32") for e in extra])
    half = _calibrate(small_model_dir, method, tmp_path / "bfloat16", "--device", "cpu", "--dtype", "bfloat16", *[e.format("bfloat16") for e in extra])
    assert "Peak memory:" in capsys.readouterr().out and half["peak_host_memory_bytes"] > 2**20
    artifact = kvcompress.hub.CompressorArtifact.from_pretrained(tmp_path / "bfloat16")
    assert all(tensor.dtype != torch.bfloat16 for tensor in artifact.tensors.values())  # fitted and stored in float32
    for name, tolerance in AGREE[method].items():
        assert half[name] == pytest.approx(full[name], abs=tolerance), name
    if method == "gate":  # loaded without options, the cache keeps the share it was checked at
        assert kvcompress.load_cache(tmp_path / "float32").keep_ratio == 0.25
    if method == "pca":
        assert _subspace_overlap(tmp_path / "float32", tmp_path / "bfloat16") > 0.95
    # the held-out check runs the model in bfloat16 too: perplexities move, the cost of compressing does not
    assert half["perplexity_degradation"] == pytest.approx(full["perplexity_degradation"], abs=0.01)
    assert half["measured_memory_savings"] == pytest.approx(full["measured_memory_savings"], abs=0.02)


@pytest.mark.parametrize("method", ["kvsplice", "gate", "sidecar"])  # pca has no randomness beyond its samples, which kvsplice shares
def test_the_same_seed_fits_the_same_compressor_and_another_seed_another(method, small_model_dir, tmp_path):
    """--seed: samples, recall statements, batches and initial weights follow it, so a calibration can be repeated exactly
    and its spread over seeds measured; the artifact records the seed it was fitted with, and the caller's random state is left as it was."""
    def fit(name: str, seed: str) -> dict:
        extra = ["--trajectories", str(tmp_path / f"trajectories-{name}")] if method == "sidecar" else []
        caller = torch.random.get_rng_state()
        _calibrate(small_model_dir, method, tmp_path / name, "--seed", seed, *extra)
        assert torch.equal(torch.random.get_rng_state(), caller)  # the seed steers the fit alone, not the caller's random numbers
        artifact = kvcompress.hub.CompressorArtifact.from_pretrained(tmp_path / name)
        assert artifact.config["calibration"]["seed"] == int(seed)
        return artifact.tensors

    first, again, other = fit("first", "0"), fit("again", "0"), fit("other", "1")
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_a_model_spread_with_accelerate_calibrates(small_model_dir, tmp_path):
    results = _calibrate(small_model_dir, "pca", tmp_path / "auto", "--device", "auto")
    assert results["measured_memory_savings"] > 0.3


def test_gates_for_another_model_are_refused_before_the_sidecar_trains(small_model_dir, tmp_path):
    """calibrate --method sidecar --gates checks the gates against the model before collecting or training anything."""
    with pytest.raises(SystemExit, match="were fitted for SmolLM2-135M-Instruct, not for this model: give gates fitted for it"):
        main(["calibrate", "--model", str(small_model_dir), "--method", "sidecar", "--gates", str(PRETRAINED_DIR / "smollm2-135m-instruct-gate"),
              "--trajectories", str(tmp_path / "trajectories"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "trajectories").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("prompt", [["What is the capital of France?"], []], ids=["chat", "passkey demo"])
def test_generate_refuses_a_compressor_for_another_model_before_it_says_anything_of_the_prompt(small_model_dir, capsys, prompt):
    """The shipped gates are SmolLM2's: on another model `generate` stops after loading it, before its notes on the prompt
    (which had been printed, then the first attention call refused the compressor)."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *prompt, "--model", str(small_model_dir), "--compressor", f"{PRETRAINED_DIR}/smollm2-135m-instruct-gate@ratio=8"])
    assert "was fitted for" in str(exit_.value.code) and "Use a compressor fitted for this model" in str(exit_.value.code)
    printed = capsys.readouterr().out
    assert "Note:" not in printed and "Prompt:" not in printed


def test_gates_calibrated_on_a_corpus_shorter_than_gate_tokens_record_what_they_read(small_model_dir, tmp_path, capsys):
    """--gate-tokens asks for 20480 tokens by default; from a corpus of about 4k the artifact records the tokens its labels read
    (whole sequences of 1024 from the calibration part) and the phase line says the corpus held fewer."""
    from kvcompress.corpus import heldout_text

    corpus = tmp_path / "short.txt"
    corpus.write_text(heldout_text()[:20000])
    main(["calibrate", "--model", str(small_model_dir), "--method", "gate", "--data", str(corpus), "--gate-steps", "20", "--recall-facts", "0",
          "--eval-tokens", "256", "--output", str(tmp_path / "gates")])
    printed = "".join(capsys.readouterr())  # phase lines go to stderr
    recorded = json.loads((tmp_path / "gates" / "compressor_config.json").read_text())["calibration"]["tokens"]
    assert 0 < recorded < 20480 and recorded % 1024 == 0
    assert f"labelling the tokens of {recorded} calibration tokens (the corpus holds " in printed and "of the 20480 of --gate-tokens)" in printed


def test_pca_calibrated_on_a_corpus_shorter_than_tokens_says_how_many_it_read(small_model_dir, tmp_path, capsys):
    from kvcompress.corpus import heldout_text

    corpus = tmp_path / "short.txt"
    corpus.write_text(heldout_text()[:20000])
    results = _calibrate(small_model_dir, "pca", tmp_path / "pca", "--data", str(corpus))  # --tokens 2048 of QUICK, then the default 16384
    assert "samples per head from 2048 calibration tokens" in "".join(capsys.readouterr())
    main(["calibrate", "--model", str(small_model_dir), "--method", "pca", "--rank", "8", "--samples", "256", "--data", str(corpus),
          "--eval-tokens", "256", "--output", str(tmp_path / "pca-all")])
    read = json.loads((tmp_path / "pca-all" / "compressor_config.json").read_text())["calibration"]["tokens"]
    assert results["measured_memory_savings"] > 0.3 and 2048 < read < 16384
    assert f"samples per head from {read} calibration tokens (the corpus holds {read} of the 16384 of --tokens)" in "".join(capsys.readouterr())


@pytest.mark.parametrize(
    ("method", "options", "advice"),
    [
        ("gate", ["--gate-tokens", "2560"], "--gate-tokens 2560 of a corpus of .* tokens gives 2. To fit it, raise --gate-tokens to 3072 or more."),
        ("kvsplice", ["--rank", "8", "--tokens", "2048", "--samples", "256"], "--tokens 2048 of a corpus of .* tokens gives 2. To fit it, raise --tokens to 3072"),
        ("gate", ["--data", "SHORT", "--eval-tokens", "64"], "--gate-tokens 20480 of a corpus of .* tokens gives 1. To fit it, give a longer corpus \\(--data\\)."),
        ("gate", ["--data", "SHORT", "--eval-tokens", "64", "--gate-tokens", "2048"],
         "--gate-tokens 2048 of a corpus of .* tokens gives 1. To fit it, give a longer corpus \\(--data\\) and --gate-tokens 3072 or more."),
    ],
)
def test_a_method_that_holds_out_sequences_refuses_too_little_text_before_collecting(small_model_dir, tmp_path, monkeypatch, method, options, advice):
    """The gates and KVSplice stop on 2 held-out sequences of 1024 tokens: with 2 or fewer in all they are refused at once (before
    the recall sequences, the labels or the samples), with the fix that applies: a larger flag, or a longer corpus."""
    from kvcompress.corpus import heldout_text

    for collector in ("kvcompress.calibration.gates.collect_retention_labels", "kvcompress.calibration.calibrate.collect_attention_samples"):
        monkeypatch.setattr(collector, lambda *args, **kwargs: pytest.fail("collected from a corpus too short to train on"))
    (tmp_path / "short.txt").write_text(heldout_text()[:9000])  # about 2,000 tokens
    options = [str(tmp_path / "short.txt") if option == "SHORT" else option for option in options]
    with pytest.raises(SystemExit, match=rf"--method {method} holds out 2 of its calibration sequences of 1024 tokens .* needs at least 3 sequences \(3072 tokens\), and {advice}"):
        main(["calibrate", "--model", str(small_model_dir), "--method", method, *options, "--output", str(tmp_path / "out")])


def test_evaluate_writes_its_table_as_json_with_what_produced_it(small_model_dir, tmp_path, capsys):
    """`kvcompress evaluate --output` end to end on a model a user brings: the rows the table printed, and the model, data,
    settings and command that produced them."""
    output = tmp_path / "results" / "run.json"
    main(["evaluate", "--model", str(small_model_dir), "--caches", "dense", "h2o", "--ratios", "2", "--ppl-tokens", "128", "--passkey-tokens", "256",
          "--depths", "0.5", "--trials", "1", "--output", str(output)])
    printed, results = capsys.readouterr().out, json.loads(output.read_text())
    assert f"wrote {output}" in printed
    assert results["model"] == str(small_model_dir) and results["data"].endswith("held-out part")
    assert results["settings"] == {"ppl_tokens": 128, "ppl_chunk": 32, "passkey_tokens": 256, "depths": [0.5], "trials": 1}
    assert results["command"].startswith("kvcompress evaluate --model") and "--output" in results["command"]
    dense, h2o = results["rows"]
    assert (dense["cache"], h2o["cache"]) == ("dense", "h2o 2:1") and set(dense["passkey"]) == {"0.5"}
    assert dense["measured_ratio"] == 1.0 and 1.5 < h2o["measured_ratio"] < 2.5 and h2o["nbytes"] < dense["nbytes"]
    for row in (dense, h2o):  # the numbers the table printed
        assert f"| {row['cache']} | {row['measured_ratio']:.2f} | {row['nbytes'] / 1024:.0f} | {row['dense_nbytes'] / 1024:.0f} | {row['perplexity']:.3f} |" in printed
