"""The `kvcompress` command line: `generate`, `evaluate` and `calibrate`."""

from __future__ import annotations

import argparse
import functools
import json
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from kvcompress.corpus import heldout_text
from kvcompress.evaluation.harness import CACHE_CLASSES, DEPTHS, CacheSpec, build_cache, cache_nbytes, evaluate, format_table, passkey_context, rows_to_json

DEFAULT_RATIO = 8  # kvcompress generate with a budgeted cache and neither --ratio nor --budget


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local path or Hub id; none: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data", default=None, help="text file or datasets name; none: the WikiText-2 validation text shipped with kvcompress")


def _cache_from_arguments(args):
    if args.compressor:
        return CacheSpec.fitted(args.compressor).build()
    if args.ratio is not None and args.budget is not None:
        raise SystemExit(f"error: --cache {args.cache} takes one of --ratio or --budget, not both")
    ratio = DEFAULT_RATIO if args.cache != "dense" and args.ratio is None and args.budget is None else args.ratio
    return build_cache(args.cache, ratio=ratio, budget=args.budget)


def _generate(args) -> None:
    from kvcompress import cache_kwargs, load_model
    from kvcompress.cache import CompressedCache

    model, tokenizer = load_model(args.model)
    if args.prompt:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
        expected = None
    else:  # the demo: find a pass key hidden in ~1.5k tokens of prose
        expected = random.Random(args.seed).randint(10000, 99999)
        haystack = tokenizer(heldout_text(args.data)).input_ids
        context, question = passkey_context(tokenizer, haystack, args.context_tokens, args.depth, expected)
        prompt = context + question
        print(f"Prompt: {args.context_tokens} tokens of WikiText with a pass key hidden at depth {args.depth}.")
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    cache = _cache_from_arguments(args)
    started = time.perf_counter()
    output = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - started
    answer = tokenizer.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    held, dense = cache_nbytes(cache)
    print(f"Cache: {cache!r}" if isinstance(cache, CompressedCache) else f"Cache: {type(cache).__name__}")
    print(f"Answer: {answer.strip()}")
    if expected is not None:
        print(f"Expected pass key: {expected} -> {'found' if str(expected) in answer else 'NOT found'}")
    print(f"KV cache held: {held / 2**20:.2f} MiB vs dense {dense / 2**20:.2f} MiB, compression {dense / held:.2f}:1 ({seconds:.1f} s)")


def _evaluate(args) -> None:
    from kvcompress import load_model

    specs = [CacheSpec("dense")] if "dense" in args.caches else []
    specs += [CacheSpec(method, ratio) for method in args.caches if method != "dense" for ratio in args.ratios]
    specs += [CacheSpec.fitted(path) for path in args.compressors]
    model, tokenizer = load_model(args.model)
    rows = evaluate(
        model, tokenizer, specs, heldout_text(args.data), ppl_tokens=args.ppl_tokens, ppl_chunk=args.ppl_chunk,
        passkey_tokens=args.passkey_tokens, depths=args.depths, trials=args.trials,
    )
    table = format_table(rows, args.ppl_tokens, args.passkey_tokens)
    print(f"\nmodel: {model.config.name_or_path}; streaming PPL on {args.ppl_tokens} held-out tokens in chunks of "
          f"{args.ppl_chunk}; passkey at {args.passkey_tokens} tokens, {args.trials} trials per depth; memory at the end of a passkey run\n")
    print(table)
    if args.output:
        Path(args.output).write_text(rows_to_json(rows))
        print(f"\nwrote {args.output}")
    if args.plot:
        from .plots import plot_quality_vs_compression

        print(f"wrote {plot_quality_vs_compression(rows, args.plot, title=str(model.config.name_or_path).split('/')[-1])}")


def _record_command(compressor, args) -> None:
    """The artifact remembers the command that made it (its model card shows it)."""
    compressor.config.setdefault("calibration", {})["command"] = args.command_line


def _phase(message: str) -> None:
    """Announce a long phase before it starts (some run for minutes without a progress bar)."""
    print(f"-> {message}", file=sys.stderr, flush=True)


def _save_measure_report(args, compressor, measure, reports: dict, plot=None, warning: str = ""):
    """The tail every calibrator shares: save (before the minutes-long check, so a stop keeps the fit), measure on held-out
    text, save again with the metrics in the config and card, write the reports, summarise, plot and push."""
    output = Path(args.output)
    _record_command(compressor, args)
    _phase(f"saving the compressor to {output}/")
    compressor.save_pretrained(output)
    _phase("measuring held-out streaming perplexity and memory against the dense cache")
    summary = measure()
    compressor.save_pretrained(output)
    (output / "calibration_results.json").write_text(json.dumps(summary.metrics(), indent=2) + "\n")
    for name, report in reports.items():
        (output / name).write_text(json.dumps(report, indent=2) + "\n")
    written = "".join(f"{name}, " for name in reports)
    print(f"\n{summary.summary()}\n" + warning + f"\nwrote {output}/ (compressor_config.json, model.safetensors, README.md, {written}calibration_results.json)")
    if args.plot and plot is not None:
        _phase(f"plotting to {args.plot}")
        print(f"wrote {plot(summary)}")
    if args.push_to_hub:
        _phase(f"pushing to the Hub repo {args.push_to_hub}")
        print(f"pushed: {compressor.push_to_hub(args.push_to_hub)}")
    return summary


def _cache_settings(args) -> dict:
    """The sink, window and block size a calibrated compressor's caches use by default."""
    return {"sink": args.sink, "window": args.window, "block_size": args.block_size}


def _check_output(args) -> None:
    """Refuse an --output that would lose work, before any: a file, or an artifact without --overwrite."""
    output = Path(args.output)
    if output.is_file():
        raise SystemExit(f"error: --output {output} is a file; give a directory for the compressor")
    if (output / "compressor_config.json").exists() and not args.overwrite:
        raise SystemExit(f"error: --output {output} already holds a compressor; pass --overwrite to replace it, or choose another directory")
    if output.exists() and args.overwrite:
        shutil.rmtree(output)  # no stale files of the old artifact beside the new one


def _calibrate(args) -> None:
    if args.target_memory_reduction is not None and not 0 < args.target_memory_reduction < 1:
        raise SystemExit(f"error: --target-memory-reduction is the share of K/V memory to save, in (0, 1), e.g. 0.5; got {args.target_memory_reduction}")
    _check_output(args)
    if args.method == "gate":
        return _calibrate_gates(args)
    if args.method == "sidecar":
        return _calibrate_sidecar(args)
    from kvcompress import load_model
    from kvcompress.config import RankConfig
    from kvcompress.models import kv_shape

    from .calibrate import LowRankCalibration

    if args.rank is not None and (args.target_memory_reduction is not None or args.config):
        raise SystemExit("error: --rank sets every head's rank; it cannot be combined with --target-memory-reduction or --config")
    if args.rank is None and args.target_memory_reduction is None and not args.config:
        raise SystemExit("error: give --rank R, --target-memory-reduction F or --config FILE (a config may be combined with a memory target)")
    if args.rank_v is not None and args.rank is None:
        raise SystemExit("error: --rank-v needs --rank")
    started = time.perf_counter()
    _phase("loading the model")
    model, tokenizer = load_model(args.model)
    layers, kv_heads, head_dim = kv_shape(model.config)
    shape = layers, kv_heads, head_dim, head_dim
    if args.config:
        template = RankConfig.load(args.config, *shape)
    else:
        full = shape[2] if args.rank is None else args.rank
        template = RankConfig.uniform(*shape, full, args.rank_v if args.rank is not None else None, algo=args.method)
    needs_fisher = args.target_memory_reduction is not None or bool(args.plot)
    calibration = LowRankCalibration.collect(
        model, tokenizer, args.data, samples=args.samples, tokens=args.tokens, sink=args.sink,
        fisher_sequences=args.fisher_sequences if needs_fisher else 0, eval_tokens=args.eval_tokens, name_or_path=args.model,
    )
    ranks, source = calibration.ranks(template, args.target_memory_reduction)
    settings = _cache_settings(args)
    _phase(f"fitting the {args.method} projections at the chosen ranks")
    compressor, fit_metrics = calibration.fit(args.method, ranks, settings, kvsplice_steps=args.kvsplice_steps)
    seconds = time.perf_counter() - started
    reports = {"ranks.json": ranks.to_json()} | ({"fisher.json": calibration.fisher.summary(calibration.data.num_heads)} if calibration.fisher is not None else {})
    _save_measure_report(
        args, compressor, lambda: calibration.measure(compressor, fit_metrics, source, seconds), reports,
        plot=lambda summary: _plot_sweep(args, calibration, template, settings, summary.baseline_perplexity),
    )


def _calibrate_gates(args) -> None:
    from kvcompress import load_model
    from kvcompress.gate import GateCompressor, GatedCache
    from kvcompress.hub import model_signature
    from kvcompress.rope import rope_inv_freq

    from .calibrate import calibration_corpus, measure
    from .gates import collect_retention_labels, train_gates
    from .recall import recall_sequences

    started = time.perf_counter()
    _phase("loading the model")
    model, tokenizer = load_model(args.model)
    token_ids, heldout_ids, data_name = calibration_corpus(tokenizer, args.data, args.eval_tokens)
    recall = recall_sequences(token_ids[: args.gate_tokens], tokenizer, facts=args.recall_facts) if args.recall_facts else None
    inv_freq = rope_inv_freq(model)
    labels = collect_retention_labels(
        model, token_ids if recall is None else recall.token_ids, inv_freq, window=args.window, sink=args.sink,
        threshold=args.label_threshold, max_tokens=args.gate_tokens,
    )
    with torch.enable_grad():
        gates, probabilities, report = train_gates(labels, hidden=args.gate_hidden, steps=args.gate_steps)
    if recall is not None:  # do the labels see the recall? statements should be positive far more often than prose
        report["recall"] = {
            "facts_per_sequence": args.recall_facts,
            "statement_positive_rate": labels.positive_rate_among(recall.statements),
            "prose_positive_rate": labels.positive_rate_among(~recall.statements),
        }
    config = {
        "base_model": model_signature(model, args.model),
        "cache": _cache_settings(args),
        "label": {"window": args.window, "threshold": args.label_threshold, "definition": "max over queries >= window later of the group-mean attention share"},
        "calibration": {"data": data_name, "tokens": args.gate_tokens, "recall_facts_per_sequence": args.recall_facts},
    }
    compressor = GateCompressor.from_gates(gates, probabilities, inv_freq, config)
    seconds = time.perf_counter() - started
    fit_metrics = {"median_auc": report["median_auc"], "mean_positive_rate": report["mean_positive_rate"]} | {
        f"recall_{name}": value for name, value in report.get("recall", {}).items() if name.endswith("rate")
    }
    setting = f"keep ratio {args.keep_ratio:g}, per-head policy"
    _save_measure_report(
        args, compressor, lambda: measure(model, heldout_ids.to(model.device), compressor, GatedCache(compressor, args.keep_ratio), setting, seconds, fit_metrics),
        {"gate_report.json": report}, plot=lambda _: _plot("plot_gate_report", report, args.plot, title="retention gates on held-out tokens"),
    )


def _calibrate_sidecar(args) -> None:
    from kvcompress import load_model
    from kvcompress.hub import model_signature
    from kvcompress.models import cache_dir, kv_shape
    from kvcompress.rope import rope_inv_freq
    from kvcompress.sidecar import SidecarCache, SidecarNetwork

    from .calibrate import calibration_corpus, measure
    from .sidecar import LossWeights, TrainingSettings, reference_queries, sidecar_compressor, train_sidecar, unhealthy
    from .trajectories import collect_trajectories

    started = time.perf_counter()
    _phase("loading the model")
    model, tokenizer = load_model(args.model)
    token_ids, heldout_ids, data_name = calibration_corpus(tokenizer, args.data, args.eval_tokens)
    inv_freq = rope_inv_freq(model)
    directory = Path(args.trajectories) if args.trajectories else cache_dir() / "trajectories" / Path(str(model.config._name_or_path)).name
    trajectories = collect_trajectories(
        model, token_ids, directory, sequences=args.trajectory_sequences + args.heldout_sequences,
        query_positions=args.query_positions, disk_budget_gb=args.disk_budget_gb,
    )
    train, heldout = trajectories.split(args.heldout_sequences)
    network = SidecarNetwork(*kv_shape(model.config), window=args.merge_window, slots=args.slots)
    weights = LossWeights.output_matching_only() if args.loss == "output" else LossWeights()
    settings = TrainingSettings(steps=args.sidecar_steps, sink=args.sink, learning_rate=args.sidecar_lr)
    references = reference_queries(train, inv_freq, recent_window=args.window)
    with torch.enable_grad():
        training = train_sidecar(network, train, heldout, inv_freq, references, weights, settings)
    best = training["best"]
    config = {
        "base_model": model_signature(model, args.model),
        "cache": {"sink": args.sink, "window": args.window},
        "calibration": {"data": data_name, "trajectory_sequences": train.sequences, "heldout_sequences": heldout.sequences,
                        "sequence_length": trajectories.settings["sequence_length"], "query_positions": args.query_positions},
        "training": {"loss": args.loss, "weights": vars(weights), "steps": args.sidecar_steps, "best_step": training["best_step"]},
    }
    compressor = sidecar_compressor(network, references, inv_freq, config)
    seconds = time.perf_counter() - started
    fit_metrics = {f"heldout_{name}": best[name] for name in ("output_error", "output_cosine", "key_norm_ratio", "value_norm_ratio", "jacobian_norm_ratio", "entropy_ratio")}
    fit_metrics["heldout_output_error_attention_matching"] = training["initial"]["output_error"]
    setting = f"{args.merge_window}:{args.slots} windows, {args.loss} loss"
    warning = unhealthy(best)
    _save_measure_report(
        args, compressor, lambda: measure(model, heldout_ids.to(model.device), compressor, SidecarCache(compressor), setting, seconds, fit_metrics),
        {"training_history.json": training["history"]},
        plot=lambda _: _plot("plot_sidecar_training", training["history"], args.plot, title=setting),
        warning=f"WARNING: diagnostics outside [0.5, 2]: {', '.join(warning)}\n" if warning else "",
    )


def _plot(name: str, *args, **kwargs):
    """A plot from `kvcompress.calibration.plots` (imported on use: matplotlib is the calibration extra's)."""
    from . import plots

    return getattr(plots, name)(*args, **kwargs)


def _plot_sweep(args, calibration, template, settings, baseline: float) -> str:
    """PPL vs memory for Fisher-guided and uniform ranks at several memory targets."""
    from kvcompress.config import RankConfig

    from .plots import plot_perplexity_vs_memory

    curves = {"fisher-guided ranks": [], "uniform ranks": []}
    shape = template.num_layers, template.num_kv_heads, template.d_k, template.d_v
    for target in args.sweep:
        uniform_rank = round(template.d_k * (1 - target))
        for label, (ranks, _) in (
            ("fisher-guided ranks", calibration.ranks(template, target)),
            ("uniform ranks", (RankConfig.uniform(*shape, uniform_rank, algo=args.method), "given")),
        ):
            compressor, metrics = calibration.fit(args.method, ranks, settings, kvsplice_steps=args.kvsplice_steps)
            report = calibration.measure(compressor, metrics, label, 0.0, baseline=baseline)
            curves[label].append((ranks.memory_fraction(), report.perplexity))
            print(f"{args.method} {label} at {100 * ranks.memory_fraction():.1f}% memory: perplexity {report.perplexity:.3f} ({100 * report.degradation:+.2f}%)")
    title = f"{args.method} on {str(calibration.signature['name_or_path']).split('/')[-1]}"
    return plot_perplexity_vs_memory(curves, baseline, args.plot, title=title)


def _pretrained(args) -> None:
    from kvcompress import list_pretrained

    print("| Hub id | cache | method | base model | compression | perplexity (dense) | pass key @1.5k / @6k | multi-key | MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for item in list_pretrained():
        results, metrics = item.evaluation, item.calibration_metrics
        ratio = results.get("compression_ratio") or 1 / (1 - metrics["measured_memory_savings"])
        perplexity = results.get("perplexity", metrics["perplexity"])
        dense = metrics["baseline_perplexity"]
        passkey = " / ".join(f"{results[name]:.2f}" if name in results else "-" for name in ("passkey_1536", "passkey_6144"))
        multikey = f"{results['multikey_1536']:.2f}" if "multikey_1536" in results else "-"
        print(f"| {item.repo_id} | {item.cache_class} | {item.method} | {item.base_model} | {ratio:.2f}:1 | {perplexity:.2f} ({dense:.2f}) | {passkey} | {multikey} | {item.size_bytes / 2**20:.1f} |")
    print("\nLoad one with <cache>.from_pretrained(<Hub id>); it is downloaded from the Hub where the Hub has it, else the copy shipped with kvcompress is used.")


def _publish(args) -> None:
    from kvcompress import publish_pretrained

    repo_ids = publish_pretrained(args.namespace, dry_run=args.dry_run, private=args.private)
    print(f"{'would publish' if args.dry_run else 'published'} {len(repo_ids)} repositories" + (" (dry run: nothing was uploaded)" if args.dry_run else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompress", description="KV-cache compression for HuggingFace causal LMs.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser = functools.partial(commands.add_parser, formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # every option shows its default

    _add_generate(commands)
    _add_evaluate(commands)
    _add_calibrate(commands)
    _add_hub_commands(commands)
    return parser


def _add_generate(commands) -> None:
    generate = commands.add_parser("generate", help="generate with a compressed cache and report the memory it held")
    generate.add_argument("prompt", nargs="?", help="a user message; none: the passkey-retrieval demo")
    _add_model_arguments(generate)
    generate.add_argument("--cache", choices=sorted(CACHE_CLASSES), default="h2o", help="the cache to generate with (unless --compressor)")
    generate.add_argument("--ratio", type=float, default=None, help=f"compression ratio, e.g. 4 for 4:1; none and no --budget: {DEFAULT_RATIO:g}")
    generate.add_argument("--budget", type=int, default=None, help="tokens kept per layer and KV head")
    generate.add_argument(
        "--compressor", default=None, metavar="DIR_OR_HUB_ID[@OPTIONS]",
        help="use a fitted compressor instead of --cache: a directory (kvcompress calibrate --output) or a Hub id (kvcompress pretrained lists the shipped ones), "
        "with cache options after @, e.g. kvcompress/smollm2-135m-instruct-gate@keep_ratio=0.07",
    )
    generate.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate")
    generate.add_argument("--context-tokens", type=int, default=1536, help="passkey demo: prompt length")
    generate.add_argument("--depth", type=float, default=0.5, help="passkey demo: where the key is hidden (0..1)")
    generate.add_argument("--seed", type=int, default=0, help="passkey demo: random seed of the key and its filler")
    generate.set_defaults(run=_generate)


def _add_evaluate(commands) -> None:
    evaluate_ = commands.add_parser("evaluate", help="streaming perplexity, passkey retrieval and memory of several caches")
    _add_model_arguments(evaluate_)
    evaluate_.add_argument("--caches", nargs="*", default=["dense", "streamingllm", "h2o"], choices=sorted(CACHE_CLASSES), help="caches to compare")
    evaluate_.add_argument("--ratios", nargs="+", type=float, default=[2, 4, 8], help="compression ratios of the budgeted caches")
    evaluate_.add_argument(
        "--compressors", nargs="+", default=[], metavar="DIR_OR_HUB_ID[@OPTIONS]",
        help="also evaluate fitted compressors (directories or Hub ids), e.g. gate-dir@keep_ratio=0.08,policy=layer",
    )
    evaluate_.add_argument("--ppl-tokens", type=int, default=1024, help="held-out tokens for streaming perplexity")
    evaluate_.add_argument("--ppl-chunk", type=int, default=32, help="tokens per forward in the perplexity stream")
    evaluate_.add_argument("--passkey-tokens", type=int, default=1536, help="length of each passkey prompt")
    evaluate_.add_argument("--depths", nargs="+", type=float, default=list(DEPTHS), help="where the key is hidden (0..1)")
    evaluate_.add_argument("--trials", type=int, default=2, help="passkey prompts per depth")
    evaluate_.add_argument("--output", default=None, help="also write the results as JSON")
    evaluate_.add_argument("--plot", default=None, help="also plot quality vs compression to this PNG")
    evaluate_.set_defaults(run=_evaluate)


def _add_calibrate(commands) -> None:
    calibrate = commands.add_parser("calibrate", help="fit a compressor (pca, kvsplice, gate or sidecar), measure it and save it")
    _add_model_arguments(calibrate)
    calibrate.add_argument("--method", choices=["pca", "kvsplice", "gate", "sidecar"], required=True, help="what to fit")
    calibrate.add_argument("--rank", type=int, default=None, help="uniform rank of every head's keys (and values, unless --rank-v)")
    calibrate.add_argument("--rank-v", type=int, default=None, help="uniform rank of the values, with --rank")
    calibrate.add_argument("--target-memory-reduction", type=float, default=None, help="Fisher-guided ranks that save this share of K/V memory, e.g. 0.5")
    calibrate.add_argument("--config", default=None, help="rank config JSON (see kvcompress.config); with a memory target, its enabled heads get Fisher ranks")
    calibrate.add_argument("--output", required=True, help="directory for the compressor artifact")
    calibrate.add_argument("--overwrite", action="store_true", help="replace an artifact already in --output")
    calibrate.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload the artifact to this Hub repo")
    calibrate.add_argument("--plot", default=None, help="also plot to this PNG: perplexity vs memory over --sweep (pca, kvsplice), the gate report (gate), training diagnostics (sidecar)")
    calibrate.add_argument("--sweep", nargs="+", type=float, default=[0.25, 0.5, 0.625, 0.75], help="memory reductions for --plot")
    calibrate.add_argument("--samples", type=int, default=4096, help="key/value samples per head")
    calibrate.add_argument("--tokens", type=int, default=16384, help="calibration tokens to collect from")
    calibrate.add_argument("--fisher-sequences", type=int, default=8, help="512-token sequences for Fisher information")
    calibrate.add_argument("--kvsplice-steps", type=int, default=300, help="training steps of each KVSplice projection")
    calibrate.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens for the perplexity check")
    calibrate.add_argument("--sink", type=int, default=4, help="first tokens kept exact by the fitted cache")
    calibrate.add_argument("--window", type=int, default=64, help="recent tokens kept exact by the fitted cache")
    calibrate.add_argument("--block-size", type=int, default=16, help="tokens that leave the window together")
    gate = calibrate.add_argument_group("gate")
    gate.add_argument("--keep-ratio", type=float, default=0.125, help="share of tokens leaving the window the check keeps")
    gate.add_argument("--label-threshold", type=float, default=0.02, help="attention share from a later query that makes a token worth keeping")
    gate.add_argument("--gate-tokens", type=int, default=20480, help="calibration tokens to label (in sequences of 1024)")
    gate.add_argument(
        "--recall-facts", type=int, default=4,
        help="short statements spliced into each calibration sequence and asked for at its end, so the labels see recall (0: prose only)",
    )
    gate.add_argument("--gate-steps", type=int, default=400, help="training steps of the gates")
    gate.add_argument("--gate-hidden", type=int, default=256, help="width of each gate MLP")
    sidecar = calibrate.add_argument_group("sidecar")
    sidecar.add_argument("--merge-window", type=int, default=32, choices=[32, 64, 128], help="N: tokens merged per window")
    sidecar.add_argument("--slots", type=int, default=4, help="k: super-tokens per window; N:k is the merge ratio (32:4 = 8:1, as the shipped sidecar-8x)")
    sidecar.add_argument("--loss", choices=["force", "output"], default="force", help="force: consistency + force + Jacobian + norm terms; output: output matching only (ablation)")
    sidecar.add_argument("--sidecar-steps", type=int, default=400, help="training steps of the sidecar network")
    sidecar.add_argument("--sidecar-lr", type=float, default=3e-4, help="learning rate of the sidecar network")
    sidecar.add_argument("--trajectories", default=None, metavar="DIR", help="trajectory shards (collected there, or resumed); none: under the kvcompress cache")
    sidecar.add_argument("--trajectory-sequences", type=int, default=24, help="1024-token sequences to train on")
    sidecar.add_argument("--heldout-sequences", type=int, default=4, help="further sequences for held-out diagnostics")
    sidecar.add_argument("--query-positions", type=int, default=128, help="future queries (with forces) stored per sequence")
    sidecar.add_argument("--disk-budget-gb", type=float, default=4.0, help="most disk the trajectory shards may take")
    calibrate.set_defaults(run=_calibrate)


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
    args.command_line = shlex.join(["kvcompress", *argv])
    torch.set_grad_enabled(False)
    try:
        args.run(args)
    except Exception as error:  # one clear line for a user; the traceback with --debug
        if args.debug:
            raise
        raise SystemExit(f"error: {error}\n(run with kvcompress --debug ... for the traceback)") from None


if __name__ == "__main__":
    sys.exit(main())
