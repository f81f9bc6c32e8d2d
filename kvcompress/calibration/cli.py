"""The `kvcompress` command line: `generate`, `evaluate`, `calibrate`, `pretrained` and `publish`.

Every option is explained with its default (`kvcompress <command> --help`). Bad input is refused in
one line before any work: flag values as they are parsed, combinations and paths right after. An
error during the work is one line too; `--debug` shows its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import io
import json
import logging
import math
import random
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcompress.baselines import RecentOnly
from kvcompress.corpus import DEFAULT_CORPUS_NAME, heldout_text
from kvcompress.evaluation.harness import CACHE_CLASSES, DEPTHS, CacheSpec, build_cache, cache_nbytes, check_specs, evaluate, format_table, passkey_context, results_json
from kvcompress.extras import require
from kvcompress.hub import CONFIG_FILE, known_methods, looks_like_local_path
from kvcompress.lowrank import LowRankCompressor
from kvcompress.memory import DEFAULT_CONTEXT, DEFAULT_KEEP_RATIO
from kvcompress.models import DEFAULT_MODEL, DTYPES, check_device

DEFAULT_RATIO = 8  # kvcompress generate with a budgeted cache and neither --ratio nor --budget
CHANCE_AUC = 0.6  # fitted gates whose median held-out AUC is below this are reported as close to chance
SHORT_PROMPT_KEPT = 64  # prompt tokens a baseline's ratio must leave, at least, before generate stops warning that it keeps too few
DEMO_NEW_TOKENS, CHAT_NEW_TOKENS = 16, 128  # generate's default --max-new-tokens: a pass key is a few tokens, an answer a few sentences
logger = logging.getLogger("kvcompress")
EMBEDDED_MODEL_GATES = "kvcompress/smollm2-135m-instruct-gate"  # generate's cache on the embedded model when none is chosen, at --ratio (default 8)
LOWRANK_METHODS = tuple(known_methods(LowRankCompressor))  # pca, kvsplice: one calibrator


# ------------------------------------------------------------------------------------------ parsing
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; a required option has none to show."""

    def _get_help_string(self, action):
        return action.help if action.required else super()._get_help_string(action)

    def _get_default_metavar_for_optional(self, action):
        return getattr(action.type, "metavar", None) or super()._get_default_metavar_for_optional(action)


class _Parser(argparse.ArgumentParser):
    """A parser whose options show their defaults and which refuses bad input in one line (the usage is one --help away)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option is reported by the command it was given to, with the nearest one it has."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self.commands().get(getattr(parsed, "command", None), self)
            flags = [flag for action in parser._actions for flag in action.option_strings]
            close = [difflib.get_close_matches(extra.partition("=")[0], flags, n=1) if extra.startswith("-") else [] for extra in extras]
            hints = "".join(f"; did you mean {match[0]} for {extra}?" for extra, match in zip(extras, close) if match)
            parser.error(f"unrecognized arguments: {' '.join(extras)}{hints}")
        return parsed

    def commands(self) -> dict:
        """The parser of each command (kvcompress calibrate, ...) by its name; none for a command's own parser."""
        return next((action.choices for action in self._actions if isinstance(action, argparse._SubParsersAction)), {})

    def given(self, args, *flags: str) -> list[str]:
        """Those of `flags` that the command line set to something other than their default."""
        return [flag for flag in flags if getattr(args, _dest(flag)) != self.get_default(_dest(flag))]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _checked(convert, accept, requirement: str, metavar: str):
    """An argparse type: the text `convert`ed, refused unless `accept`ed (NaN never is) with 'must be `requirement`'."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    parse.metavar = metavar  # what --help calls the value
    return parse


COUNT = _checked(int, lambda n: n >= 1, "a whole number >= 1", "N")
COUNT_OR_ZERO = _checked(int, lambda n: n >= 0, "a whole number >= 0", "N")
RATIO = _checked(float, lambda x: 1 <= x < math.inf, "a compression ratio >= 1, e.g. 4 for 4:1", "RATIO")
SHARE = _checked(float, lambda x: 0 < x < 1, "in (0, 1)", "F")
SHARE_OR_ALL = _checked(float, lambda x: 0 < x <= 1, "in (0, 1]", "F")
SHARE_OR_NONE = _checked(float, lambda x: 0 <= x < 1, "in [0, 1)", "F")
DEPTH = _checked(float, lambda x: 0 <= x <= 1, "in [0, 1] (0: the start of the context, 1: its end)", "D")
POSITIVE = _checked(float, lambda x: 0 < x < math.inf, "a number > 0", "X")
NUMBERS = (COUNT, COUNT_OR_ZERO, RATIO, SHARE, SHARE_OR_ALL, SHARE_OR_NONE, DEPTH, POSITIVE, int)  # option types that `calibrate()` takes as numbers only


def _model(text: str) -> str:
    if Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is a file; give the model's directory or a Hub id")
    if not Path(text).exists() and looks_like_local_path(text):
        raise argparse.ArgumentTypeError(f"there is no directory {text}; give a local model directory or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")
    return text


def _corpus(text: str) -> str:
    local = Path(text.partition("@")[0])
    if not Path(text).is_file() and not local.is_dir() and (Path(text).suffix in (".txt", ".md", ".text") or looks_like_local_path(str(local))):
        raise argparse.ArgumentTypeError(f"there is no file {text}; give a text file or a datasets name such as wikitext:wikitext-2-raw-v1@validation")
    return text


def _device(text: str) -> str:
    try:
        check_device(text)
    except (ValueError, ModuleNotFoundError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


_device.metavar = "DEVICE"


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"there is no file {text}")
    return text


def _require(parser: _Parser, module: str, flag: str) -> None:
    """Refuse `flag` at once where the package it needs is missing (not after minutes of work)."""
    try:
        require(module, "calibration", flag)
    except ModuleNotFoundError as error:
        parser.error(str(error))


# ------------------------------------------------------------------------------------------ generate
def _cache_from_arguments(args):
    if args.compressor:
        return CacheSpec.fitted(args.compressor).build()
    ratio = DEFAULT_RATIO if args.cache != "dense" and args.ratio is None and args.budget is None else args.ratio
    return build_cache(args.cache, ratio=ratio, budget=args.budget)


def _generate(args) -> None:
    from kvcompress import cache_kwargs, load_model
    from kvcompress.cache import CompressedCache

    cache = _cache_from_arguments(args)  # first: a compressor that is not there fails before the model loads
    _phase(f"loading the model {args.model or DEFAULT_MODEL}")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.compressor:  # one token through a fresh copy runs the first attention call's checks: a compressor fitted for
        with torch.no_grad():  # another model is refused now, not after the notes on the prompt
            model(input_ids=torch.tensor([[tokenizer.eos_token_id or 0]], device=model.device), **cache_kwargs(_cache_from_arguments(args)))
    if args.prompt:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
        expected = None
    else:  # the demo: find a pass key hidden in ~1.5k tokens of prose
        expected = random.Random(args.seed).randint(10000, 99999)
        haystack = tokenizer(heldout_text(args.data)).input_ids
        context, question = passkey_context(tokenizer, haystack, args.context_tokens, args.depth, expected)
        prompt = context + question
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    tokens = inputs.input_ids.shape[1]
    if expected is not None:
        print(f"Prompt: {tokens} tokens of WikiText with a pass key hidden at depth {args.depth}, and a question about it.")
    if args.compressor:  # built again, now that the prompt is known: a fitted cache's ratio= is met at its length where it can be
        try:
            cache = CacheSpec.fitted(args.compressor).build(context=tokens)
        except ValueError:  # the same options built a cache above: only the length is new, too short for the ratio
            print(
                f"Note: the prompt's {tokens} tokens are too few for this cache's ratio= (its exact sink and window alone would hold "
                f"more than that share of them), so it keeps the setting that meets it at {DEFAULT_CONTEXT} tokens; what it holds here "
                "is measured below."
            )
    _note_a_short_prompt(cache, tokens)
    started = time.perf_counter()
    most = args.max_new_tokens or (CHAT_NEW_TOKENS if args.prompt else DEMO_NEW_TOKENS)
    output = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=most, do_sample=False)
    seconds = time.perf_counter() - started
    answer = tokenizer.decode(output[0, tokens:], skip_special_tokens=True)
    held, dense = cache_nbytes(cache)
    print(f"Cache: {cache!r}" if isinstance(cache, CompressedCache) else f"Cache: {type(cache).__name__}")
    ended = int(output[0, -1]) in torch.tensor(model.generation_config.eos_token_id or []).view(-1).tolist()
    cut = f" [stopped at {most} new tokens: --max-new-tokens for more]" if output.shape[1] - tokens == most and not ended else ""
    print(f"Answer: {answer.strip()}{cut}")
    if expected is not None:
        print(f"Expected pass key: {expected} -> {'found' if str(expected) in answer else 'NOT found'}")
    exact = isinstance(cache, CompressedCache) and not any(layer.has_handed for layer in cache.layers)
    why = "; every token is still in the exact window (with room for the next ones), so nothing is compressed yet" if exact else ""
    print(f"KV cache held: {held / 2**20:.2f} MiB vs dense {dense / 2**20:.2f} MiB, compression {dense / held:.2f}:1{why} ({seconds:.1f} s)")


def _note_a_short_prompt(cache, tokens: int) -> None:
    """Say so where a baseline's ratio leaves little of the prompt: at 8:1 a short chat message keeps a few tokens, and the
    answer is mostly noise. Compression pays on long contexts; the learned caches keep their window exact."""
    ratio = cache.keep.budget.ratio if isinstance(getattr(cache, "keep", None), RecentOnly) else None  # StreamingLLM's and H2O's policy
    if ratio is not None and tokens / ratio < SHORT_PROMPT_KEPT:
        print(
            f"Note: at {ratio:g}:1 this cache keeps about {math.ceil(tokens / ratio)} of the prompt's {tokens} tokens: the answer sees only those. "
            "Compression pays on long contexts: for a short message use --cache dense or --budget 256, or a fitted compressor "
            f"(--compressor; the default on the embedded model, the gates {EMBEDDED_MODEL_GATES}), which keeps the recent window exact."
        )


def _check_generate(parser: _Parser, args) -> None:
    if args.compressor:
        given = parser.given(args, "--cache", "--ratio", "--budget")
        if given:
            parser.error(f"--compressor brings its own cache: give its settings after @ (e.g. DIR@keep_ratio=0.07), not {given[0]}")
    elif args.ratio is not None and args.budget is not None:
        parser.error(f"--cache {args.cache or 'h2o'} takes one of --ratio or --budget, not both")
    elif args.cache == "dense" and (args.ratio is not None or args.budget is not None):
        parser.error("--cache dense keeps every token: it takes no --ratio or --budget")
    given = parser.given(args, "--data", "--context-tokens", "--depth", "--seed") if args.prompt else []
    if given:
        parser.error(f"{given[0]} sets up the passkey demo, which a prompt replaces")
    if not args.compressor and args.cache is None:  # the default: the shipped gates (at --ratio) where they fit the model, else H2O
        if args.model is None and args.budget is None:
            args.compressor = f"{EMBEDDED_MODEL_GATES}@ratio={args.ratio or DEFAULT_RATIO:g}"
            args.ratio = None
        else:
            args.cache = "h2o"


# ------------------------------------------------------------------------------------------ evaluate
def _evaluate(args) -> None:
    from kvcompress import load_model

    specs = [CacheSpec("dense")] if "dense" in args.caches else []
    specs += [CacheSpec(method, ratio) for method in args.caches if method != "dense" for ratio in args.ratios]
    specs += [CacheSpec.fitted(path) for path in args.compressors]
    check_specs(specs, args.passkey_tokens)
    _phase(f"loading the model {args.model or DEFAULT_MODEL}")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    rows = evaluate(
        model, tokenizer, specs, heldout_text(args.data), ppl_tokens=args.ppl_tokens, ppl_chunk=args.ppl_chunk,
        passkey_tokens=args.passkey_tokens, depths=args.depths, trials=args.trials,
    )
    table = format_table(rows, args.ppl_tokens, args.passkey_tokens)
    print(f"\nmodel: {model.config.name_or_path}; streaming PPL on {args.ppl_tokens} held-out tokens in chunks of "
          f"{args.ppl_chunk}; passkey at {args.passkey_tokens} tokens, {args.trials} trial{'s' if args.trials != 1 else ''} per depth; memory at the end of a passkey run\n")
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        settings = {name: getattr(args, name) for name in ("ppl_tokens", "ppl_chunk", "passkey_tokens", "depths", "trials")}
        Path(args.output).write_text(results_json(rows, model=model.config.name_or_path, data=f"{args.data or DEFAULT_CORPUS_NAME}, held-out part", settings=settings, command=args.command_line))
        print(f"\nwrote {args.output}")
    if args.plot:
        from .plots import plot_quality_vs_compression

        print(f"wrote {plot_quality_vs_compression(rows, args.plot, title=str(model.config.name_or_path).split('/')[-1])}")


def _check_evaluate(parser: _Parser, args) -> None:
    if not args.caches and not args.compressors:
        parser.error("nothing to evaluate: give --caches, --compressors or both")
    if args.output and Path(args.output).is_dir():
        parser.error(f"--output {args.output} is a directory; give the name of the JSON file to write")
    if args.plot:
        _require(parser, "matplotlib", "--plot")


# ------------------------------------------------------------------------------------------ calibrate
def _short_corpus(available: int, asked: int, flag: str) -> str:
    """What a phase line adds where the corpus holds fewer tokens than `flag` asks for (the run reads what there is)."""
    return f" (the corpus holds {available} of the {asked} of {flag})" if available < asked else ""


def _check_validation_sequences(method: str, sequences: int, sequence_length: int, available: int, flag: str, asked: int) -> None:
    """Refuse, before collecting, a corpus (or a `flag`) too short for a method that holds out some of its calibration
    sequences to stop on; `sequences`: those `asked` tokens of `available` give."""
    from .training import VALIDATION_SEQUENCES

    if sequences <= VALIDATION_SEQUENCES:
        needed = (VALIDATION_SEQUENCES + 1) * sequence_length
        fix = f"raise {flag} to {needed} or more" if available >= needed else f"give a longer corpus (--data){f' and {flag} {needed} or more' if asked < needed else ''}"
        raise ValueError(
            f"--method {method} holds out {VALIDATION_SEQUENCES} of its calibration sequences of {sequence_length} tokens to validate on "
            f"and trains on the rest: it needs at least {VALIDATION_SEQUENCES + 1} sequences ({needed} tokens), and {flag} {asked} of a "
            f"corpus of {available} tokens gives {sequences}. To fit it, {fix}."
        )


def _phase(message: str) -> None:
    """Announce a long phase before it starts (some run for minutes without a progress bar)."""
    print(f"-> {message}", file=sys.stderr, flush=True)


@dataclass
class _Fitted:
    """What a calibrator hands the tail all of them share."""

    compressor: object
    measure: Callable  # seconds of calibration -> CalibrationReport: the held-out check (minutes)
    reports: dict  # further JSON files of the artifact directory: name -> content
    plot: Callable | None = None  # CalibrationReport -> the path written (with --plot)
    warning: str = ""


def _calibrate(args) -> None:
    """Load the model and the corpus, fit with the method's calibrator, then save, measure, report and push."""
    from kvcompress import load_model

    from .calibrate import calibration_corpus

    started = time.perf_counter()
    _phase(f"loading the model {args.model or DEFAULT_MODEL}")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    _phase(f"reading and tokenizing the corpus {args.data or '(the shipped WikiText-2)'}")
    corpus = calibration_corpus(model, tokenizer, args.data, args.eval_tokens)
    fitted = CALIBRATORS[args.method](args, model, tokenizer, *corpus)
    _finish(args, fitted, time.perf_counter() - started)


PYTHON_REFUSED = {  # options of `kvcompress calibrate` that `calibrate()` does not take (beside its arguments), and what stands for each
    "device": "the model's own device is used", "dtype": "the model's own dtype is used", "output": "save with compressor.save_pretrained(DIR)",
    "overwrite": "save with compressor.save_pretrained(DIR)", "push_to_hub": "upload with compressor.push_to_hub(REPO_ID)",
    "debug": "errors raise with their traceback",
}


def calibrate(model, tokenizer, method: str, **options) -> tuple:
    """Fit a compressor of `method` (pca, kvsplice, gate or sidecar) for `model` and check it on held-out text, as `kvcompress
    calibrate` does: the same defaults, checks, progress and report, nothing saved. `options` are the command's options by their
    Python names (``rank=16``, ``target_memory_reduction=0.5``, ``gate_steps=400``, ``data="corpus.txt"``, ``plot="gates.png"``;
    `kvcompress calibrate --help` explains them). Returns ``(compressor, report)``: ``compressor.save_pretrained(DIR)`` saves
    it with its model card (the command also writes its reports beside it), ``print(report.summary())`` shows what was measured.
    """
    from kvcompress import enable

    from .calibrate import calibration_corpus

    started = time.perf_counter()
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")) or not callable(tokenizer):
        raise TypeError(f"calibrate() takes a transformers model and its tokenizer (kvcompress.load_model returns both), got {type(model).__name__} and {type(tokenizer).__name__}.")
    enable(model)  # an unsupported model is refused now, not after the fit; a model already enabled stays as it is
    parser = build_parser()
    command = parser.commands()["calibrate"]
    arguments = ("model", "method", "help")  # calibrate()'s own arguments, or nothing to pass
    options_of = {action.dest: action for action in command._actions if action.option_strings and action.dest not in (*PYTHON_REFUSED, *arguments)}
    python_names = functools.partial(_python_names, flags=[flag for action in command._actions for flag in action.option_strings])
    for name in options:
        if name in PYTHON_REFUSED:
            raise TypeError(f"calibrate() takes no {name!r}: {PYTHON_REFUSED[name]}.")
        if name not in options_of:
            close = difflib.get_close_matches(name, options_of, n=1)
            raise TypeError(f"calibrate() has no option {name!r}" + (f"; did you mean {close[0]!r}?" if close else "") + f" Its options: {', '.join(options_of)}.")
    argv = ["calibrate", "--method", str(method), "--output", "(not saved)"]
    for name, value in options.items():
        several = options_of[name].nargs == "+" and isinstance(value, (list, tuple))  # sweep=[0.25, 0.5], or one number
        numeric = options_of[name].type in NUMBERS
        if any(isinstance(item, bool) or (numeric and isinstance(item, str)) for item in (value if several else [value])):
            raise TypeError(f"calibrate() takes {name} as {'a number' if numeric else 'a path or a name'}, got {value!r}.")
        if value is not None:
            argv += [options_of[name].option_strings[0], *map(str, value if several else [value])]
    args = _parse_as_python(parser, argv, python_names)
    shown = {name: str(value) if isinstance(value, Path) else value for name, value in options.items()}
    args.command_line = f"kvcompress.calibrate(model, tokenizer, {method!r}{''.join(f', {name}={value!r}' for name, value in shown.items())})"
    try:
        with torch.no_grad():
            corpus = calibration_corpus(model, tokenizer, args.data, args.eval_tokens)
            fitted = CALIBRATORS[args.method](args, model, tokenizer, *corpus)
            report = _final_check(fitted, args.eval_tokens, time.perf_counter() - started)
    except ValueError as error:  # the calibrators' refusals name the command line's flags
        raise ValueError(python_names(str(error))) from error
    fitted.compressor.config.setdefault("calibration", {})["command"] = args.command_line  # the model card shows it
    for line in fitted.warning.splitlines():
        logger.warning(python_names(line.removeprefix("WARNING: ")))
    if args.plot and fitted.plot is not None:
        print(f"wrote {fitted.plot(report)}")
    return fitted.compressor, report


def _parse_as_python(parser: _Parser, argv: list[str], python_names: Callable[[str], str]):
    """`argv` parsed and checked as the command line would be, its refusals raised as ValueError in Python's names (gate_steps, not --gate-steps)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(argv)
            args.check(args, saving=False)
    except SystemExit:
        said = errors.getvalue().strip()
        message = said.partition(": error: ")[2].rpartition(" (see ")[0] or said
        raise ValueError(python_names(message.replace("argument --", "--")) + ".") from None
    return args


def _python_names(message: str, flags: list[str]) -> str:
    """A message of the command line with its `flags` as `calibrate()`'s keywords: --gate-steps as gate_steps (other text stays)."""
    pattern = r"(?<![\w-])(" + "|".join(map(re.escape, sorted(flags, key=len, reverse=True))) + r")(?![\w-])"
    return re.sub(pattern, lambda match: match.group(1).lstrip("-").replace("-", "_"), message)


def _finish(args, fitted: _Fitted, seconds: float) -> None:
    """The tail every calibrator shares: save (before the minutes-long check, so a stop keeps the fit), measure on held-out
    text, save again with the metrics in the config and card, write the reports, summarise, plot and push."""
    output, compressor = Path(args.output), fitted.compressor
    compressor.config.setdefault("calibration", {})["command"] = args.command_line  # the model card shows it
    if args.overwrite and (output / CONFIG_FILE).is_file():
        _phase(f"removing the old compressor in {output}/")
        shutil.rmtree(output)  # only now the new one is fitted; no stale files of the old one beside it
    _phase(f"saving the compressor to {output}/")
    compressor.save_pretrained(output)
    summary = _final_check(fitted, args.eval_tokens, seconds)
    compressor.save_pretrained(output)
    (output / "calibration_results.json").write_text(json.dumps(summary.metrics(), indent=2) + "\n")
    for name, report in summary.reports.items():
        (output / name).write_text(json.dumps(report, indent=2) + "\n")
    written = "".join(f"{name}, " for name in summary.reports)
    print(f"\n{summary.summary()}\n" + fitted.warning + f"\nwrote {output}/ (compressor_config.json, model.safetensors, README.md, {written}calibration_results.json)")
    if args.plot and fitted.plot is not None:
        _phase(f"plotting to {args.plot}")
        print(f"wrote {fitted.plot(summary)}")
    if args.push_to_hub:
        _phase(f"pushing to the Hub repo {args.push_to_hub}")
        print(f"pushed: {compressor.push_to_hub(args.push_to_hub)}")


def _final_check(fitted: _Fitted, eval_tokens: int, seconds: float):
    """The check the command and `calibrate()` end with: the calibration's peak memory so far, then perplexity and memory on
    held-out text, compressed and dense; the report's metrics go into the compressor's config (its model card shows them), and
    it carries the method's further reports."""
    from .calibrate import peak_memory

    peak = peak_memory()  # of the calibration, before the check
    _phase(f"checking streaming perplexity and memory on {eval_tokens} held-out tokens, compressed and dense (the final check)")
    report = fitted.measure(seconds)
    report.peak_memory, report.reports = peak, fitted.reports
    fitted.compressor.config["metrics"] = report.metrics()
    return report


def _cache_settings(args) -> dict:
    """The sink, window and block size a calibrated compressor's caches use by default."""
    return {"sink": args.sink, "window": args.window, "block_size": args.block_size}


def _fit_lowrank(args, model, tokenizer, token_ids, heldout_ids, data_name) -> _Fitted:
    from kvcompress.config import RankConfig
    from kvcompress.models import kv_shape

    from .calibrate import LowRankCalibration
    from .collect import SAMPLE_SEQUENCE

    layers, kv_heads, head_dim = kv_shape(model.config)
    shape = layers, kv_heads, head_dim, head_dim
    for flag, rank in (("--rank", args.rank), ("--rank-v", args.rank_v)):
        if rank is not None and rank > head_dim:
            raise ValueError(f"{flag} {rank} is more than this model's head dim ({head_dim}), the numbers a key or value holds: give {flag} from 1 to {head_dim}.")
    if args.config:
        template = RankConfig.load(args.config, *shape)
    else:
        full = shape[2] if args.rank is None else args.rank
        template = RankConfig.uniform(*shape, full, args.rank_v if args.rank is not None else None, algo=args.method)
    needs_fisher = args.target_memory_reduction is not None or bool(args.plot)
    fisher = f", then Fisher information over {args.fisher_sequences} sequences" if needs_fisher else ""
    tokens = min(len(token_ids), args.tokens)
    if args.method == "kvsplice":
        _check_validation_sequences(args.method, -(-tokens // SAMPLE_SEQUENCE), SAMPLE_SEQUENCE, len(token_ids), "--tokens", args.tokens)
    _phase(f"collecting {args.samples} key/value samples per head from {tokens} calibration tokens{_short_corpus(len(token_ids), args.tokens, '--tokens')}{fisher}")
    calibration = LowRankCalibration.from_token_ids(
        model, token_ids, heldout_ids, samples=args.samples, tokens=args.tokens, sink=args.sink,
        fisher_sequences=args.fisher_sequences if needs_fisher else 0, name_or_path=args.model, data_name=data_name, seed=args.seed,
    )
    ranks, source = calibration.ranks(template, args.target_memory_reduction)
    settings = _cache_settings(args)
    _phase(f"fitting the {args.method} projections at the {'Fisher-guided' if source == 'fisher' else 'given'} ranks")
    compressor, fit_metrics = calibration.fit(args.method, ranks, settings, kvsplice_steps=args.kvsplice_steps, seed=args.seed)
    reports = {"ranks.json": ranks.to_json()} | ({"fisher.json": calibration.fisher.summary(calibration.data.num_heads)} if calibration.fisher is not None else {})
    return _Fitted(
        compressor, lambda seconds: calibration.measure(compressor, fit_metrics, source, seconds), reports,
        plot=lambda summary: _plot_sweep(args, calibration, template, settings, summary.baseline_perplexity),
    )


def _fit_gates(args, model, tokenizer, token_ids, heldout_ids, data_name) -> _Fitted:
    from kvcompress.gate import GateCompressor, GatedCache
    from kvcompress.hub import model_signature
    from kvcompress.rope import rope_inv_freq

    from .calibrate import measure
    from .gates import LABEL_SEQUENCE, collect_retention_labels, labelled_tokens, train_gates
    from .recall import recall_sequences

    _check_validation_sequences(args.method, labelled_tokens(len(token_ids), args.gate_tokens) // LABEL_SEQUENCE, LABEL_SEQUENCE, len(token_ids), "--gate-tokens", args.gate_tokens)
    facts = 4 if args.recall_facts is None else args.recall_facts
    recall = recall_sequences(token_ids[: args.gate_tokens], tokenizer, facts=facts, seed=args.seed) if facts else None
    inv_freq = rope_inv_freq(model)
    source = token_ids if recall is None else recall.token_ids
    tokens = labelled_tokens(len(source), args.gate_tokens)
    _phase(f"labelling the tokens of {tokens} calibration tokens{_short_corpus(len(source), args.gate_tokens, '--gate-tokens')} that queries beyond the window attend to")
    labels = collect_retention_labels(model, source, inv_freq, window=args.window, sink=args.sink, threshold=args.label_threshold, max_tokens=args.gate_tokens)
    _phase(f"training the gates ({args.gate_steps} steps at most)")
    with torch.enable_grad():
        gates, probabilities, report = train_gates(labels, hidden=args.gate_hidden, steps=args.gate_steps, seed=args.seed, device=model.device)
    if recall is not None:  # do the labels see the recall? statements should be positive far more often than prose
        report["recall"] = {
            "facts_per_sequence": facts,
            "statement_positive_rate": labels.positive_rate_among(recall.statements),
            "prose_positive_rate": labels.positive_rate_among(~recall.statements),
        }
    config = {
        "base_model": model_signature(model, args.model),
        "cache": _cache_settings(args),
        "label": {"window": args.window, "threshold": args.label_threshold, "definition": "max over queries >= window later of the group-mean attention share"},
        "calibration": {"data": data_name, "tokens": tokens, "recall_facts_per_sequence": facts, "seed": args.seed},
    }
    compressor = GateCompressor.from_gates(gates, probabilities, inv_freq, config, keep_ratio=args.keep_ratio)
    fit_metrics = {"median_auc": report["median_auc"], "mean_positive_rate": report["mean_positive_rate"]} | {
        f"recall_{name}": value for name, value in report.get("recall", {}).items() if name.endswith("rate")
    }
    setting = f"keep ratio {args.keep_ratio:g}, per-head policy"
    return _Fitted(
        compressor, lambda seconds: measure(model, heldout_ids.to(model.device), compressor, GatedCache(compressor), setting, seconds, fit_metrics),
        {"gate_report.json": report}, plot=lambda _: _plot("plot_gate_report", report, args.plot, title="retention gates on held-out tokens"),
        warning="".join(f"WARNING: {line}\n" for line in _gate_warnings(report, args.label_threshold)),
    )


def _gate_warnings(report: dict, threshold: float) -> list[str]:
    """What makes fitted gates meaningless: labels of one class only (no AUC), so the gates cannot tell tokens apart, or
    gates that tell them apart little better than chance (the shipped ones reach a median AUC of 0.95)."""
    rate = report["mean_positive_rate"]
    if rate == 0:
        return [f"no calibration token reached the label threshold ({threshold:g} of a later query's attention): the gates learned nothing. "
                "Lower --label-threshold, or calibrate on longer, real text (a model with random weights attends too evenly)."]
    if rate == 1 or math.isnan(report["median_auc"]):
        return [f"the labels leave the gates nothing to tell apart (mean positive rate {rate:.3f}, median AUC {report['median_auc']}): "
                "raise --label-threshold, or calibrate on more varied text."]
    if report["median_auc"] < CHANCE_AUC:
        return [f"the gates tell the tokens that later queries need from the rest little better than chance (median AUC {report['median_auc']:.2f} "
                "on held-out tokens; 0.5 is chance): they keep tokens almost at random. Train longer (--gate-steps) on more text (--gate-tokens)."]
    return []


def _fit_sidecar(args, model, tokenizer, token_ids, heldout_ids, data_name) -> _Fitted:
    from kvcompress.gate import GateCompressor
    from kvcompress.hub import model_signature, same_base_model
    from kvcompress.models import kv_shape
    from kvcompress.rope import rope_inv_freq
    from kvcompress.sidecar import SidecarCache, SidecarCompressor, SidecarNetwork

    from .calibrate import measure
    from .recall import recall_sequences
    from .sidecar import KeptByGates, LossWeights, TrainingSettings, reference_queries, train_sidecar, training_warnings
    from .trajectories import collect_trajectories

    inv_freq = rope_inv_freq(model)
    gates = GateCompressor.from_pretrained(args.gates) if args.gates else None  # before the long work: a bad id or model fails at once
    if gates is not None and not same_base_model(model_signature(model, args.model), gates.config["base_model"]):
        raise ValueError(f"--gates {args.gates} were fitted for {gates.config['base_model']['name_or_path']}, not for this model: give gates fitted for it (--method gate).")
    facts = args.recall_facts or 0  # statements recalled at each sequence's end: queries (and forces) that retrieve
    stream = recall_sequences(token_ids, tokenizer, facts=facts, seed=args.seed).token_ids if facts else token_ids
    _phase(f"collecting the trajectories of {args.trajectory_sequences + args.heldout_sequences} sequences")
    trajectories = collect_trajectories(
        model, stream, args.trajectories, sequences=args.trajectory_sequences + args.heldout_sequences, disk_budget_gb=args.disk_budget_gb,
        query_positions=args.query_positions, seed=args.seed, source=f"recall sequences, {facts} facts each" if facts else None,
    )
    train, heldout = trajectories.split(args.heldout_sequences)
    with torch.random.fork_rng(devices=[]):  # the initial weights follow --seed without touching the caller's random state
        torch.manual_seed(args.seed)
        network = SidecarNetwork(*kv_shape(model.config), window=args.merge_window, slots=args.slots)
    weights = LossWeights.output_matching_only() if args.loss == "output" else LossWeights()
    settings = TrainingSettings(steps=args.sidecar_steps, sink=args.sink, learning_rate=args.sidecar_lr, seed=args.seed, device=str(model.device))
    references = reference_queries(train, inv_freq, recent_window=args.window, seed=args.seed)
    _phase(f"training the sidecar network ({args.sidecar_steps} steps; first attention matching on the held-out sequences, the starting point)")
    with torch.enable_grad():
        training = train_sidecar(
            network, train, heldout, inv_freq, references, weights, settings, gates=KeptByGates(gates, args.train_keep_ratio) if args.train_keep_ratio else None,
        )
    best = training["best"]
    config = {
        "base_model": model_signature(model, args.model),
        "cache": {"sink": args.sink, "window": args.window},
        "calibration": {"data": data_name, "trajectory_sequences": train.sequences, "heldout_sequences": heldout.sequences,
                        "sequence_length": trajectories.settings["sequence_length"], "query_positions": args.query_positions,
                        "recall_facts_per_sequence": facts, "seed": args.seed},
        "training": {"loss": args.loss, "weights": vars(weights), "steps": args.sidecar_steps, "best_step": training["best_step"], "train_keep_ratio": args.train_keep_ratio},
    }
    compressor = SidecarCompressor.from_network(network, references.queries, references.offsets, inv_freq, config)
    compressor = compressor.with_gates(gates) if gates is not None else compressor
    fit_metrics = {f"heldout_{name}": best[name] for name in ("output_error", "output_cosine", "key_norm_ratio", "value_norm_ratio", "jacobian_norm_ratio", "entropy_ratio")}
    fit_metrics["heldout_output_error_attention_matching"] = training["initial"]["output_error"]
    setting = f"{args.merge_window}:{args.slots} windows, {args.loss} loss" + (", keep-and-merge with the gates' default keep ratio" if gates is not None else "")
    return _Fitted(
        compressor, lambda seconds: measure(model, heldout_ids.to(model.device), compressor, SidecarCache(compressor), setting, seconds, fit_metrics),
        {"training_history.json": training["history"]},
        plot=lambda _: _plot("plot_sidecar_training", training["history"], args.plot, title=setting),
        warning="".join(f"WARNING: {line}\n" for line in training_warnings(training)),
    )


CALIBRATORS = dict.fromkeys(LOWRANK_METHODS, _fit_lowrank) | {"gate": _fit_gates, "sidecar": _fit_sidecar}  # one per method


def _plot(name: str, *args, **kwargs):
    """A plot from `kvcompress.calibration.plots` (imported on use: matplotlib is the calibration extra's)."""
    from . import plots

    return getattr(plots, name)(*args, **kwargs)


def _plot_sweep(args, calibration, template, settings, baseline: float) -> str:
    """PPL vs memory for Fisher-guided and uniform ranks at several memory targets."""
    from kvcompress.config import RankConfig

    from .plots import plot_perplexity_vs_memory

    _phase(f"sweeping {len(args.sweep)} memory targets for the plot: a fit and a held-out check each, with Fisher-guided and with uniform ranks")
    curves = {"fisher-guided ranks": [], "uniform ranks": []}
    shape = template.num_layers, template.num_kv_heads, template.d_k, template.d_v
    for target in args.sweep:
        uniform_rank = round(template.d_k * (1 - target))
        for label, (ranks, _) in (
            ("fisher-guided ranks", calibration.ranks(template, target)),
            ("uniform ranks", (RankConfig.uniform(*shape, uniform_rank, algo=args.method), "given")),
        ):
            compressor, metrics = calibration.fit(args.method, ranks, settings, kvsplice_steps=args.kvsplice_steps, seed=args.seed)
            report = calibration.measure(compressor, metrics, label, 0.0, baseline=baseline)
            curves[label].append((ranks.memory_fraction(), report.perplexity))
            print(f"{args.method} {label} at {100 * ranks.memory_fraction():.1f}% memory: perplexity {report.perplexity:.3f} ({100 * report.degradation:+.2f}%)")
    title = f"{args.method} on {str(calibration.signature['name_or_path']).split('/')[-1]}"
    return plot_perplexity_vs_memory(curves, baseline, args.plot, title=title)


def _check_calibrate(parser: _Parser, args, saving: bool = True) -> None:
    """Everything that can be refused before the model loads: options of other methods, combinations, --output (when `saving`:
    `calibrate()` saves nothing)."""
    for group in parser._action_groups:
        methods = getattr(group, "methods", None)
        given = parser.given(args, *(action.option_strings[0] for action in group._group_actions)) if methods and args.method not in methods else []
        if given:
            parser.error(f"{given[0]} is an option of --method {' / '.join(methods)}, not of --method {args.method}")
    if args.method in LOWRANK_METHODS:
        if args.rank is not None and (args.target_memory_reduction is not None or args.config):
            parser.error("--rank sets every head's rank; it cannot be combined with --target-memory-reduction or --config")
        if args.rank is None and args.target_memory_reduction is None and not args.config:
            parser.error("give --rank R, --target-memory-reduction F or --config FILE (a config may be combined with a memory target)")
        if args.rank_v is not None and args.rank is None:
            parser.error("--rank-v needs --rank")
        if args.tokens < args.samples:
            parser.error(f"--tokens ({args.tokens}) must be at least --samples ({args.samples}): the samples are drawn from those tokens")
    if args.method == "sidecar" and args.train_keep_ratio and not args.gates:
        parser.error("--train-keep-ratio is the share the gates keep while the network trains: it needs --gates")
    if args.method == "sidecar" and args.slots >= args.merge_window:
        parser.error(f"--slots ({args.slots}) must be fewer than --merge-window ({args.merge_window}): each window of N tokens becomes k super-tokens")
    if args.plot:
        _require(parser, "matplotlib", "--plot")
    if args.push_to_hub:
        from huggingface_hub import get_token

        if get_token() is None:
            parser.error("--push-to-hub needs a Hub login: run `hf auth login` (or set HF_TOKEN) first")
    if not saving:
        return
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        parser.error(f"--output {output} is a file; give a directory for the compressor")
    if (output / CONFIG_FILE).exists() and not args.overwrite:
        parser.error(f"--output {output} already holds a compressor; pass --overwrite to replace it, or choose another directory")


# ------------------------------------------------------------------------------------------ hub
def _pretrained(args) -> None:
    from kvcompress import list_pretrained

    print("| Hub id | cache | options | method | base model | compression | perplexity (dense) | pass key @1.5k / @6k | multi-key | artifact MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for item in list_pretrained():
        results, metrics = item.evaluation, item.calibration_metrics
        ratio = results.get("compression_ratio") or 1 / (1 - metrics["measured_memory_savings"])
        perplexity = results.get("perplexity", metrics["perplexity"])
        dense = metrics["baseline_perplexity"]
        passkey = " / ".join(f"{results[name]:.2f}" if name in results else "-" for name in ("passkey_1536", "passkey_6144"))
        multikey = f"{results['multikey_1536']:.2f}" if "multikey_1536" in results else "-"
        options = ", ".join(f"{name}={value}" for name, value in item.load_options.items()) or "-"
        cells = [item.repo_id, item.cache_class, options, item.method, item.base_model, f"{ratio:.2f}:1", f"{perplexity:.2f} ({dense:.2f})", passkey, multikey,
                 f"{item.size_bytes / 2**20:.1f}"]
        print(f"| {' | '.join(cells)} |")
    print(
        "\nLoad one with <cache>.from_pretrained(<Hub id>, <options>): its numbers were measured with those options (without them a "
        "compressor keeps the default it was fitted with). It is downloaded from the Hub where the Hub has it, else the copy shipped "
        "with kvcompress is used."
    )


def _publish(args) -> None:
    from kvcompress import publish_pretrained

    repo_ids = publish_pretrained(args.namespace, dry_run=args.dry_run, private=args.private)
    print(f"{'would publish' if args.dry_run else 'published'} {len(repo_ids)} repositories" + (" (dry run: nothing was uploaded)" if args.dry_run else ""))


# ------------------------------------------------------------------------------------------ the parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvcompress", description="KV-cache compression for HuggingFace causal LMs.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_generate(commands)
    _add_evaluate(commands)
    _add_calibrate(commands)
    _add_hub_commands(commands)
    for command in commands.choices.values():  # --debug also after the command; given or not, the one before it holds
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error, not just its message (off unless given)")
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=_model, default=None, metavar="DIR_OR_HUB_ID", help="local directory or Hub id; none: the embedded SmolLM2-135M-Instruct")
    parser.add_argument(
        "--data", type=_corpus, default=None, metavar="FILE_OR_DATASET",
        help="text file or datasets name (name[:config][@split]); none: the WikiText-2 validation text shipped with kvcompress",
    )
    parser.add_argument(
        "--device", type=_device, default=None,
        help="where the model runs: cpu, cuda, cuda:N, or auto (its layers spread over every GPU with accelerate); none: cuda when there is a GPU, else cpu",
    )
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto",
        help="the model's weights and activations; auto: the model's own (float32 for the embedded model, bfloat16 for most Hub models). Statistics accumulate in float32",
    )


def _add_generate(commands) -> None:
    generate = commands.add_parser("generate", help="generate with a compressed cache and report the memory it held")
    generate.add_argument("prompt", nargs="?", help="a user message; none: the passkey-retrieval demo")
    _add_model_arguments(generate)
    generate.add_argument(
        "--cache", choices=sorted(CACHE_CLASSES), default=None,
        help=f"the cache to generate with (unless --compressor); none: on the embedded model its shipped gates ({EMBEDDED_MODEL_GATES}) at --ratio, "
        "else h2o (and with --budget)",
    )
    generate.add_argument("--ratio", type=RATIO, default=None, help=f"compression ratio, e.g. 4 for 4:1; none and no --budget: {DEFAULT_RATIO:g}")
    generate.add_argument("--budget", type=COUNT, default=None, help="tokens kept per layer and KV head (instead of --ratio)")
    generate.add_argument(
        "--compressor", default=None, metavar="DIR_OR_HUB_ID[@OPTIONS]",
        help="use a fitted compressor instead of --cache: a directory (kvcompress calibrate --output) or a Hub id (kvcompress pretrained lists the shipped ones), "
        "with cache options after @, e.g. kvcompress/smollm2-135m-instruct-gate@keep_ratio=0.07",
    )
    generate.add_argument(
        "--max-new-tokens", type=COUNT, default=None, help=f"most tokens to generate; none: {DEMO_NEW_TOKENS} for the pass-key demo, {CHAT_NEW_TOKENS} for a prompt",
    )
    generate.add_argument("--context-tokens", type=COUNT, default=1536, help="passkey demo: prompt length")
    generate.add_argument("--depth", type=DEPTH, default=0.5, help="passkey demo: where the key is hidden (0..1)")
    generate.add_argument("--seed", type=int, default=0, help="passkey demo: random seed of the key and its filler")
    generate.set_defaults(run=_generate, check=functools.partial(_check_generate, generate))


def _add_evaluate(commands) -> None:
    evaluate_ = commands.add_parser("evaluate", help="streaming perplexity, passkey retrieval and memory of several caches")
    _add_model_arguments(evaluate_)
    evaluate_.add_argument("--caches", nargs="*", default=["dense", "streamingllm", "h2o"], choices=sorted(CACHE_CLASSES), help="caches to compare")
    evaluate_.add_argument("--ratios", nargs="+", type=RATIO, default=[2, 4, 8], help="compression ratios of the budgeted caches")
    evaluate_.add_argument(
        "--compressors", nargs="+", default=[], metavar="DIR_OR_HUB_ID[@OPTIONS]",
        help="also evaluate fitted compressors (directories or Hub ids), e.g. gate-dir@keep_ratio=0.08,policy=layer",
    )
    evaluate_.add_argument("--ppl-tokens", type=COUNT, default=1024, help="held-out tokens for streaming perplexity")
    evaluate_.add_argument("--ppl-chunk", type=COUNT, default=32, help="tokens per forward in the perplexity stream")
    evaluate_.add_argument("--passkey-tokens", type=COUNT, default=1536, help="length of each passkey prompt")
    evaluate_.add_argument("--depths", nargs="+", type=DEPTH, default=list(DEPTHS), help="where the key is hidden (0..1)")
    evaluate_.add_argument("--trials", type=COUNT, default=2, help="passkey prompts per depth")
    evaluate_.add_argument("--output", default=None, metavar="FILE", help="also write the results as JSON")
    evaluate_.add_argument("--plot", default=None, metavar="PNG", help="also plot quality vs compression to this PNG")
    evaluate_.set_defaults(run=_evaluate, check=functools.partial(_check_evaluate, evaluate_))


def _method_options(parser: argparse.ArgumentParser, *methods: str):
    """An argument group of the options only `methods` use (any other method refuses them)."""
    group = parser.add_argument_group(f"options of --method {' / '.join(methods)}")
    group.methods = methods
    return group


def _add_calibrate(commands) -> None:
    calibrate = commands.add_parser("calibrate", help="fit a compressor (pca, kvsplice, gate or sidecar), measure it and save it")
    _add_model_arguments(calibrate)
    calibrate.add_argument(
        "--method", choices=known_methods(), required=True,
        help="what to fit: pca or kvsplice (low-rank keys and values), gate (retention gates), sidecar (a network merging windows of tokens)",
    )
    calibrate.add_argument("--output", required=True, metavar="DIR", help="directory for the compressor artifact")
    calibrate.add_argument("--overwrite", action="store_true", help="replace an artifact already in --output (removed once the new one is fitted)")
    calibrate.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload the artifact to this Hub repo (needs `hf auth login`)")
    calibrate.add_argument(
        "--plot", default=None, metavar="PNG",
        help="also plot to this PNG: perplexity vs memory over --sweep (pca, kvsplice: Fisher information, then a fit and a held-out check "
        "per point, so several times the calibration's time), the gate report (gate), training diagnostics (sidecar)",
    )
    calibrate.add_argument("--eval-tokens", type=COUNT, default=1024, help="held-out tokens for the perplexity check")
    calibrate.add_argument("--sink", type=COUNT_OR_ZERO, default=4, help="first tokens kept exact by the fitted cache")
    calibrate.add_argument("--window", type=COUNT, default=64, help="recent tokens kept exact by the fitted cache")
    calibrate.add_argument(
        "--seed", type=COUNT_OR_ZERO, default=0,
        help="random seed of the samples, recall statements, training batches and initial weights: the same seed on the same machine fits the same "
        "compressor; other seeds show how much a result owes to chance",
    )
    blocks = _method_options(calibrate, *LOWRANK_METHODS, "gate")
    blocks.add_argument("--block-size", type=COUNT, default=16, help="tokens that leave the window together")

    lowrank = _method_options(calibrate, *LOWRANK_METHODS)
    lowrank.add_argument("--rank", type=COUNT, default=None, help="uniform rank of every head's keys (and values, unless --rank-v)")
    lowrank.add_argument("--rank-v", type=COUNT, default=None, help="uniform rank of the values, with --rank")
    lowrank.add_argument("--target-memory-reduction", type=SHARE, default=None, help="Fisher-guided ranks that save this share of K/V memory, e.g. 0.5")
    lowrank.add_argument("--config", type=_existing_file, default=None, metavar="FILE", help="rank config JSON (see kvcompress.config); with a memory target, its enabled heads get Fisher ranks")
    lowrank.add_argument("--sweep", nargs="+", type=SHARE, default=[0.25, 0.5, 0.625, 0.75], help="memory reductions for --plot")
    lowrank.add_argument("--samples", type=COUNT, default=4096, help="key/value samples per head")
    lowrank.add_argument("--tokens", type=COUNT, default=16384, help="calibration tokens to collect from (kvsplice: at least 3 sequences of 1024, 2 of them held out to validate on)")
    lowrank.add_argument("--fisher-sequences", type=COUNT, default=8, help="512-token sequences for Fisher information")
    kvsplice = _method_options(calibrate, "kvsplice")
    kvsplice.add_argument("--kvsplice-steps", type=COUNT, default=300, help="training steps of each KVSplice projection")

    gate = _method_options(calibrate, "gate")
    gate.add_argument(
        "--keep-ratio", type=SHARE_OR_ALL, default=DEFAULT_KEEP_RATIO,
        help="share of tokens leaving the window that the check keeps, and that the compressor keeps when loaded without options",
    )
    gate.add_argument("--label-threshold", type=SHARE, default=0.02, help="attention share from a later query that makes a token worth keeping")
    gate.add_argument("--gate-tokens", type=COUNT, default=20480, help="calibration tokens to label, in sequences of 1024 (at least 3072: 2 sequences are held out to validate on)")
    gate.add_argument("--gate-steps", type=COUNT, default=400, help="training steps of the gates")
    gate.add_argument("--gate-hidden", type=COUNT, default=256, help="width of each gate MLP")

    recall = _method_options(calibrate, "gate", "sidecar")
    recall.add_argument(
        "--recall-facts", type=COUNT_OR_ZERO, default=None,
        help="short statements spliced into each calibration sequence and asked for at its end, so the gates' labels (and the "
        "sidecar's queries and forces) see recall; 0: prose only; unset: 4 for --method gate, 0 for --method sidecar",
    )

    sidecar = _method_options(calibrate, "sidecar")
    sidecar.add_argument("--merge-window", type=int, default=32, choices=[32, 64, 128], help="N: tokens merged per window")
    sidecar.add_argument(
        "--slots", type=COUNT, default=4,
        help="k: super-tokens each window of N tokens becomes, so N:k is the compression of the merged tokens (32:4 = 8:1, as the shipped sidecar-8x)",
    )
    sidecar.add_argument(
        "--gates", default=None, metavar="DIR_OR_HUB_ID",
        help="gates fitted for the same model (--method gate) to carry in the artifact: its caches keep what the gates mark exact and merge the rest "
        "(keep-and-merge); the network itself trains on whole windows unless --train-keep-ratio",
    )
    sidecar.add_argument(
        "--train-keep-ratio", type=SHARE_OR_NONE, default=0.0,
        help="with --gates: while the network trains, the gates keep exact the tokens that reach their threshold for this share (fitted on "
        "their held-out tokens), and the network merges only the rest of each window, as the cache will. At 8:1 beside 32:1 merges the budget "
        "keeps about 0.02 at 1.5k tokens and 0.08 at 6k; 0.05 measured no better than whole windows (docs/methods.md#keep-and-merge). "
        "0: whole windows",
    )
    sidecar.add_argument("--loss", choices=["force", "output"], default="force", help="force: consistency + force + Jacobian + norm terms; output: output matching only (ablation)")
    sidecar.add_argument("--sidecar-steps", type=COUNT, default=400, help="training steps of the sidecar network")
    sidecar.add_argument("--sidecar-lr", type=POSITIVE, metavar="LR", default=3e-4, help="learning rate of the sidecar network")
    sidecar.add_argument("--trajectories", default=None, metavar="DIR", help="trajectory shards (collected there, or resumed); none: under the kvcompress cache")
    sidecar.add_argument("--trajectory-sequences", type=COUNT, default=24, help="1024-token sequences to train on")
    sidecar.add_argument("--heldout-sequences", type=COUNT, default=4, help="further sequences for held-out diagnostics")
    sidecar.add_argument("--query-positions", type=COUNT, default=128, help="future queries (with forces) stored per sequence")
    sidecar.add_argument("--disk-budget-gb", type=POSITIVE, metavar="GB", default=4.0, help="most disk the trajectory shards may take")
    calibrate.set_defaults(run=_calibrate, check=functools.partial(_check_calibrate, calibrate))


def _add_hub_commands(commands) -> None:
    pretrained = commands.add_parser("pretrained", help="list the pretrained compressors that ship with kvcompress, with their measured memory and quality")
    pretrained.set_defaults(run=_pretrained)

    publish = commands.add_parser("publish", help="upload the shipped compressors to the Hub (create_repo + upload_folder; needs `hf auth login`)")
    publish.add_argument("--namespace", default="kvcompress", help="Hub user or organisation to publish under")
    publish.add_argument("--dry-run", action="store_true", help="only print what would be uploaded where")
    publish.add_argument("--private", action="store_true", help="create the repositories as private")
    publish.set_defaults(run=_publish)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if getattr(args, "check", None):
        args.check(args)  # combinations and paths, before any work
    args.command_line = shlex.join(["kvcompress", *argv])
    torch.set_grad_enabled(False)
    try:
        args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:  # one clear line for a user; the traceback with --debug
        if args.debug:
            raise
        raise SystemExit(f"error: {error}\n(run with kvcompress --debug ... for the traceback)") from None


if __name__ == "__main__":
    sys.exit(main())
