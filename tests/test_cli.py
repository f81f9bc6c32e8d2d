"""The CLI as a user meets it: every option explained with its default, bad input refused at once in one line."""

import argparse
import json
import time

import pytest
from conftest import tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import kvcompress
from kvcompress.calibration import cli
from kvcompress.calibration.calibrate import CalibrationReport
from kvcompress.calibration.cli import build_parser, main
from kvcompress.hub import known_methods


def _subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("name", sorted(_subcommands(build_parser())))
def test_every_option_has_help_and_shows_its_default(name):
    command = _subcommands(build_parser())[name]
    formatter = command._get_formatter()
    assert isinstance(formatter, argparse.ArgumentDefaultsHelpFormatter)
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        option = f"kvcompress {name} {action.option_strings[0] if action.option_strings else action.dest}"
        assert action.help, f"{option} has no help"
        assert "(default:" not in action.help, f"{option}: the formatter adds the default once"
        if action.required or action.default is argparse.SUPPRESS:  # nothing to show: it must be given / it is off unless given
            continue
        assert "%(default)s" in formatter._get_help_string(action), f"{option} does not show its default"


def test_every_method_has_a_calibrator():
    assert sorted(cli.CALIBRATORS) == known_methods()


def test_the_sidecar_default_is_the_shipped_merge_ratio():
    args = build_parser().parse_args(["calibrate", "--method", "sidecar", "--output", "x"])
    assert (args.merge_window, args.slots) == (32, 4)  # 8:1, as kvcompress/smollm2-135m-instruct-sidecar-8x


def _refused_at_once(argv, message, capsys):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert time.perf_counter() - started < 1.0  # before any model is loaded
    err = capsys.readouterr().err
    text = str(exit_.value.code) + err
    assert exit_.value.code != 0 and message in text, text
    assert len(err.strip().splitlines()) <= 1 and "Traceback" not in err  # one line, no usage block
    return err


@pytest.mark.parametrize("value", ["1.5", "-0.2", "0", "1", "nan", "half"])
def test_a_memory_target_outside_0_1_is_refused_before_any_work(value, capsys, tmp_path):
    _refused_at_once(["calibrate", "--method", "pca", "--target-memory-reduction", value, "--output", str(tmp_path / "out")], "in (0, 1)", capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "--method", "pca", "--rank", "0"], "argument --rank: must be a whole number >= 1, got '0'"),
        (["calibrate", "--method", "pca", "--rank", "8.5"], "argument --rank: must be a whole number >= 1"),
        (["calibrate", "--method", "pca", "--rank", "8", "--samples", "-1"], "argument --samples"),
        (["calibrate", "--method", "pca", "--target-memory-reduction", "0.5", "--sweep", "0.5", "2"], "argument --sweep: must be in (0, 1)"),
        (["calibrate", "--method", "gate", "--keep-ratio", "0"], "argument --keep-ratio: must be in (0, 1]"),
        (["calibrate", "--method", "gate", "--label-threshold", "1"], "argument --label-threshold"),
        (["calibrate", "--method", "gate", "--sink", "-1"], "argument --sink: must be a whole number >= 0"),
        (["calibrate", "--method", "sidecar", "--sidecar-lr", "0"], "argument --sidecar-lr: must be a number > 0"),
        (["calibrate", "--method", "sidecar", "--disk-budget-gb", "inf"], "argument --disk-budget-gb"),
        (["calibrate", "--method", "sidecar", "--slots", "32"], "--slots (32) must be fewer than --merge-window (32)"),
        (["evaluate", "--ratios", "4", "0.5"], "argument --ratios: must be a compression ratio >= 1"),
        (["evaluate", "--depths", "1.5"], "argument --depths: must be in [0, 1]"),
        (["evaluate", "--trials", "0"], "argument --trials"),
        (["generate", "--ratio", "0.5"], "argument --ratio: must be a compression ratio >= 1"),
        (["generate", "--budget", "0"], "argument --budget"),
        (["generate", "--depth", "-0.1"], "argument --depth"),
        (["calibrate", "--method", "gate", "--keep-ration", "0.1"], "unrecognized arguments: --keep-ration 0.1; did you mean --keep-ratio for --keep-ration? (see kvcompress calibrate --help)"),
        (["evaluate", "--ppl-tokenz=64", "--bogus"], "unrecognized arguments: --ppl-tokenz=64 --bogus; did you mean --ppl-tokens for --ppl-tokenz=64? (see kvcompress evaluate --help)"),
    ],
)
def test_bad_numbers_are_refused_when_parsed(argv, message, capsys, tmp_path):
    output = ["--output", str(tmp_path / "out")] if argv[0] == "calibrate" else []
    err = _refused_at_once([*argv, *output], message, capsys)
    assert err.startswith(f"kvcompress {argv[0]}: error: ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "--method", "gate", "--rank", "8"], "--rank is an option of --method kvsplice / pca, not of --method gate"),
        (["calibrate", "--method", "pca", "--rank", "8", "--slots", "8"], "--slots is an option of --method sidecar"),
        (["calibrate", "--method", "pca", "--rank", "8", "--recall-facts", "2"], "--recall-facts is an option of --method gate / sidecar"),
        (["calibrate", "--method", "gate", "--gates", "g"], "--gates is an option of --method sidecar"),
        (["calibrate", "--method", "sidecar", "--train-keep-ratio", "0.1"], "--train-keep-ratio is the share the gates keep while the network trains: it needs --gates"),
        (["calibrate", "--method", "pca", "--rank", "8", "--kvsplice-steps", "10"], "--kvsplice-steps is an option of --method kvsplice"),
        (["calibrate", "--method", "sidecar", "--block-size", "8"], "--block-size is an option of --method kvsplice / pca / gate"),
        (["calibrate", "--method", "pca", "--rank", "8", "--samples", "4096", "--tokens", "1024"], "--tokens (1024) must be at least --samples (4096)"),
        (["generate", "--ratio", "4", "--budget", "64"], "takes one of --ratio or --budget"),
        (["generate", "--cache", "dense", "--budget", "64"], "--cache dense keeps every token"),
        (["generate", "--compressor", "somewhere", "--cache", "dense"], "--compressor brings its own cache"),
        (["generate", "hello", "--context-tokens", "512"], "--context-tokens sets up the passkey demo"),
        (["evaluate", "--caches"], "nothing to evaluate"),
    ],
)
def test_options_that_would_be_ignored_are_refused(argv, message, capsys, tmp_path):
    output = ["--output", str(tmp_path / "out")] if argv[0] == "calibrate" else []
    _refused_at_once([*argv, *output], message, capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/no/such/model"], "there is no directory /no/such/model"),
        (["--model", "./my-model"], "there is no directory ./my-model"),
        (["--data", "missing-corpus.txt"], "there is no file missing-corpus.txt"),
        (["--config", "missing-ranks.json"], "there is no file missing-ranks.json"),
    ],
)
def test_missing_paths_are_refused_before_the_model_loads(argv, message, capsys, tmp_path):
    _refused_at_once(["calibrate", "--method", "pca", *argv, "--output", str(tmp_path / "out")], message, capsys)


def _artifact(directory):
    directory.mkdir()
    (directory / "compressor_config.json").write_text("{}")
    (directory / "stale.json").write_text("{}")
    return directory


def test_output_is_checked_before_any_work(capsys, tmp_path):
    existing = _artifact(tmp_path / "artifact")
    _refused_at_once(["calibrate", "--method", "gate", "--output", str(existing)], "pass --overwrite", capsys)
    assert (existing / "stale.json").exists()  # nothing was touched
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _refused_at_once(["calibrate", "--method", "gate", "--output", str(a_file)], "is a file", capsys)
    _refused_at_once(["calibrate", "--method", "gate", "--output", str(a_file), "--overwrite"], "is a file", capsys)


class _FakeCompressor:
    method = "gate"

    def __init__(self):
        self.config = {}

    def save_pretrained(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "compressor_config.json").write_text(json.dumps(self.config))


@pytest.fixture
def no_model(monkeypatch):
    """`kvcompress calibrate` without a model: loading and the corpus are stubbed, the gate calibrator is `fit` (set it)."""
    calls = []
    monkeypatch.setattr("kvcompress.load_model", lambda name, device, dtype: calls.append("load") or (None, None))
    monkeypatch.setattr("kvcompress.calibration.calibrate.calibration_corpus", lambda model, tokenizer, data, eval_tokens: (None, None, "corpus"))
    return calls


def test_overwrite_replaces_the_old_artifact_once_the_new_one_is_fitted(tmp_path, capsys, monkeypatch, no_model):
    existing = _artifact(tmp_path / "artifact")

    def fit(args, *_):
        assert (existing / "stale.json").exists()  # the old artifact is still there while fitting
        compressor = _FakeCompressor()
        return cli._Fitted(compressor, lambda seconds: CalibrationReport("gate", "fake", 10.0, 11.0, 50, 100, 8, seconds), {"report.json": {"a": 1}})

    monkeypatch.setitem(cli.CALIBRATORS, "gate", fit)
    main(["calibrate", "--method", "gate", "--output", str(existing), "--overwrite"])
    assert no_model == ["load"]
    assert sorted(path.name for path in existing.iterdir()) == ["calibration_results.json", "compressor_config.json", "report.json"]
    config = json.loads((existing / "compressor_config.json").read_text())
    assert config["calibration"]["command"].endswith(f"--output {existing} --overwrite")
    assert json.loads((existing / "calibration_results.json").read_text())["perplexity"] == 11.0
    captured = capsys.readouterr()
    assert "Perplexity degradation: +10.00%" in captured.out
    for phase in ("-> loading the model", "-> reading and tokenizing", "-> removing the old compressor", "-> saving the compressor", "-> checking streaming perplexity"):
        assert phase in captured.err


def test_a_failed_calibration_keeps_the_old_artifact(tmp_path, monkeypatch, no_model):
    existing = _artifact(tmp_path / "artifact")

    def fit(args, *_):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(cli.CALIBRATORS, "gate", fit)
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--method", "gate", "--output", str(existing), "--overwrite"])
    assert str(exit_.value.code).startswith("error: out of memory\n")
    assert (existing / "stale.json").exists()


def test_errors_are_one_line_unless_debug(tmp_path, capsys):
    missing = str(tmp_path / "no-such-compressor")
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--compressor", missing])
    assert str(exit_.value.code).startswith("error: ") and "--debug" in str(exit_.value.code)
    assert time.perf_counter() - started < 5  # the compressor is looked for before the model loads
    for argv in (["--debug", "generate", "--compressor", missing], ["generate", "--compressor", missing, "--debug"]):
        with pytest.raises(Exception) as raised:
            main(argv)
        assert not isinstance(raised.value, SystemExit)


def test_the_short_prompt_note_is_for_a_baselines_ratio_only(capsys):
    """A ratio leaves ceil(tokens / ratio) of a prompt to StreamingLLM and H2O (window included): under 64 it says so;
    a token budget, dense and a long prompt get no note."""
    from transformers import DynamicCache

    from kvcompress import H2OCache, StreamingLLMCache

    for cache, tokens, noted in [
        (H2OCache(ratio=8), 37, True), (StreamingLLMCache(ratio=4), 200, True), (H2OCache(ratio=8), 600, False),
        (StreamingLLMCache(budget=256), 37, False), (DynamicCache(), 37, False),
    ]:
        cli._note_a_short_prompt(cache, tokens)
        assert ("keeps about" in capsys.readouterr().out) == noted, (cache, tokens)


@pytest.mark.parametrize(
    "argv, cache, compressor",
    [
        ([], None, f"{cli.EMBEDDED_MODEL_GATES}@ratio=8"),  # the embedded model: its shipped gates at 8:1
        (["hello"], None, f"{cli.EMBEDDED_MODEL_GATES}@ratio=8"),
        (["--ratio", "4"], None, f"{cli.EMBEDDED_MODEL_GATES}@ratio=4"),  # at the ratio asked for
        (["--budget", "256"], "h2o", None),  # a token budget is a baseline's
        (["--model", "."], "h2o", None),  # another model: nothing shipped fits it
        (["--cache", "streamingllm"], "streamingllm", None),
        (["--compressor", "somewhere"], None, "somewhere"),
    ],
)
def test_generates_default_cache_is_the_shipped_gates_on_the_embedded_model_only(argv, cache, compressor):
    args = cli.build_parser().parse_args(["generate", *argv])
    args.check(args)
    assert (args.cache, args.compressor) == (cache, compressor) and (args.ratio is None or args.cache == "h2o")


@pytest.mark.parametrize("ranks, flag", [((1000, None), "--rank 1000"), ((4, 33), "--rank-v 33")])
def test_a_rank_above_the_head_dim_is_refused_naming_the_option(ranks, flag):
    from conftest import tiny_model

    model = tiny_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head dim 32
    args = argparse.Namespace(rank=ranks[0], rank_v=ranks[1], config=None)
    with pytest.raises(ValueError, match=rf"{flag} is more than this model's head dim \(32\), the numbers a key or value holds: give {flag.split()[0]} from 1 to 32"):
        cli._fit_lowrank(args, model, None, None, None, None)


@pytest.mark.parametrize(("held", "explained"), [(105, True), (100, True), (50, False)])
def test_a_summary_that_measured_no_savings_says_why_it_may_be(held, explained):
    summary = CalibrationReport("sidecar", "32:4 windows", 10.0, 10.0, held, 100, 128, 1.0).summary()
    assert f"Memory savings:         {100 - held:.1f}% measured at 128 tokens" in summary
    assert ("may still hold them all (measure with more eval_tokens: --eval-tokens on the command line), or the setting compresses nothing" in summary) == explained


def test_calibrate_from_python_fits_and_checks_as_the_command_does(default_model, tmp_path):
    """kvcompress.calibrate: the command's defaults and report, its options by Python names, nothing saved until asked."""
    model, tokenizer = default_model
    compressor, report = kvcompress.calibrate(model, tokenizer, "pca", rank=16, window=16, samples=128, tokens=512, eval_tokens=96)
    assert type(compressor) is kvcompress.PCACompressor and compressor.ranks.memory_fraction() == 0.25
    assert compressor.config["metrics"] == report.metrics() and report.eval_tokens == 96 and report.memory_savings > 0
    assert report.perplexity > report.baseline_perplexity
    assert set(report.reports) == {"ranks.json"} and report.reports["ranks.json"]["per_layer_head"]["0/0"]["rank"] == 16  # what the command writes beside the artifact
    assert compressor.config["calibration"]["command"] == "kvcompress.calibrate(model, tokenizer, 'pca', rank=16, window=16, samples=128, tokens=512, eval_tokens=96)"
    assert compressor.config["calibration"]["data"].startswith("WikiText-2") and compressor.cache_settings()["window"] == 16 and compressor.cache_settings()["sink"] == 4  # the command's default sink
    compressor.save_pretrained(tmp_path / "pca")
    assert type(kvcompress.load_cache(tmp_path / "pca")) is kvcompress.PCACache


@pytest.mark.parametrize("options, error, says", [
    ({}, ValueError, r"^give rank R, target_memory_reduction F or config FILE"),
    ({"rank": 0}, ValueError, r"^rank: must be a whole number >= 1, got '0'\.$"),
    ({"rank": 8, "gate_steps": 3}, ValueError, r"^gate_steps is an option of method gate, not of method pca\.$"),
    ({"ranks": 8}, TypeError, r"calibrate\(\) has no option 'ranks'; did you mean 'rank'\? Its options: data, plot, eval_tokens"),
    ({"rank": 8, "output": "dir"}, TypeError, r"calibrate\(\) takes no 'output': save with compressor.save_pretrained\(DIR\)"),
    ({"rank": "16"}, TypeError, r"^calibrate\(\) takes rank as a number, got '16'\.$"),
    ({"rank": 8, "plot": True}, TypeError, r"^calibrate\(\) takes plot as a path or a name, got True\.$"),
    ({"rank": 8, "sweep": 1.5}, ValueError, r"^sweep: must be in \(0, 1\), got '1.5'\.$"),  # one number for a list: read as one
])
def test_calibrate_from_python_refuses_bad_options_in_python_names(options, error, says):
    with pytest.raises(error, match=says):
        kvcompress.calibrate(tiny_model("llama"), lambda text: None, "pca", **options)  # refused before the model is used


def test_calibrate_from_python_says_what_it_takes_instead_of_none_or_an_unsupported_model():
    with pytest.raises(TypeError, match=r"calibrate\(\) takes a transformers model and its tokenizer \(kvcompress.load_model returns both\), got NoneType"):
        kvcompress.calibrate(None, None, "gate")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"kvcompress supports Llama-family decoders .* this model is 'gpt2'"):  # before any work
        kvcompress.calibrate(gpt2, lambda text: None, "pca", rank=8)


def test_python_names_replace_only_the_commands_flags():
    message = "corpus--v2.txt gives 2 sequences: raise --gate-tokens to 3072 (or --gate-tokens-like text stays)"
    assert cli._python_names(message, ["--gate-tokens", "--method"]) == "corpus--v2.txt gives 2 sequences: raise gate_tokens to 3072 (or --gate-tokens-like text stays)"
