"""Quality vs compression of every cache on the same prompts, in one run: tables, plots, docs section.

    python benchmarks/quality.py --gate results/gate-recall --lowrank results/pca-fisher50 results/kvsplice-fisher50 \\
        --composed-lowrank results/pca-uniform16 --sidecar results/sidecar-8 [--kvpress docs/benchmark/kvpress.json] \\
        [--ratios 2 4 8 16 32] [--device cuda] [--output docs/benchmark] [--update-docs [docs/benchmarks.md]]

For every target ratio it evaluates StreamingLLM, H2O, the gates (``ratio=``, a budget met from each task's
length on, as a user asks for it) and the composition gates x low rank x int4, the last at the same measured
memory as the baselines at both pass-key lengths (its keep ratio found per length by bisection,
`MatchedSpec`; perplexity streams at the short length's, as do the gates' budgets); the
fitted caches whose ratio is fixed by their artifact (PCA, KVSplice, sidecar, int8 alone, low rank x int8)
are evaluated once. A cache whose exact sink and window alone exceed the target's budget is left out
(and listed). Tasks (`kvcompress/evaluation/tasks.py`), all on held-out prose the compressors never
saw: streaming perplexity, pass key by depth at two lengths, multi-key needle, variable tracking.
The measured ratio is dense bytes over held bytes at the end of the perplexity text, and of the middle
pass-key prompt of each length (the composition's keep ratios are matched on those prompts).

`--export-prompts FILE` writes the prompts and settings for `benchmarks/kvpress_runner.py` (which
runs NVIDIA's kvpress presses in a virtual environment of their own); `--kvpress FILE` merges its
results into the same tables and plots.

`--peers quanto hqq` adds transformers' own `QuantizedCache` (KIVI-style int4 and int2 groups, its last
128 tokens exact) with those backends (`pip install optimum-quanto` / `hqq`); `--only-peers` runs just
them and dense, and `--merge FILE` (also with `--render`) adds the rows of another run to the tables,
its environment named beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from doc_block import add_update_docs, update_block  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import QuantizedCache  # noqa: E402

import kvcompress  # noqa: E402
from kvcompress import ComposedCache  # noqa: E402
from kvcompress.corpus import heldout_text  # noqa: E402
from kvcompress.evaluation.harness import (  # noqa: E402
    QUANTIZED_CACHE_PACKAGES,
    CacheSpec,
    answer,
    cache_nbytes,
    passkey_context,
    quantized_cache_backend_installed,
    streaming_perplexity,
)
from kvcompress.evaluation.tasks import Prompt, heldout_passkey_prompts, multikey_prompts, score, variables_prompts  # noqa: E402
from kvcompress.gate import GateCompressor  # noqa: E402
from kvcompress.lowrank import LowRankCompressor  # noqa: E402


@dataclass
class Settings:
    ppl_tokens: int = 1024
    short: int = 1536
    long: int = 6144
    short_depths: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    long_depths: tuple = (0.1, 0.5, 0.9)
    heldout_depths: tuple = (0.2, 0.5, 0.8)  # the pass key in the evaluator's held-out wordings, each at these depths
    heldout_long_depths: tuple = (0.5,)
    trials: int = 2
    task_trials: int = 4

    def tokens(self, task: str) -> int:
        """The length at which a matched cache's memory is set for a task: its prompts' (perplexity: the short prompts',
        as at 1,024 tokens the exact sink, window and tail alone hold more than the higher targets allow)."""
        return self.long if "long" in task else self.short

    def chunk(self, context: int, size: int = 1024) -> int | None:
        """Prefill chunk for prompts of `context` tokens: the long ones go in chunks (bounded prefill memory)."""
        return size if context == self.long else None


@dataclass
class Row:
    method: str  # one line of the plot
    cache: str
    target: float | None  # target ratio, None for caches whose ratio their artifact fixes
    scores: dict = field(default_factory=dict)  # task -> mean score (perplexity for "ppl")
    nbytes: int = 0  # held at the end of the reference (middle) pass-key prompt of the short length
    dense_nbytes: int = 0
    seconds: float = 0.0
    ratios: dict = field(default_factory=dict)  # measured ratio at the end of the perplexity text ("ppl") and of the long reference prompt ("passkey_long")

    @property
    def measured_ratio(self) -> float:
        return self.dense_nbytes / self.nbytes if self.nbytes else float("nan")


def prompts(tokenizer, text: str, settings: Settings, heldout_wordings: bool = False) -> tuple[torch.Tensor, dict[str, list[Prompt]]]:
    """The perplexity tokens and every task's prompts, cut from the held-out text; with `heldout_wordings`, also the pass
    key in the wordings the evaluator holds out from calibration (`passkey_heldout`, `passkey_heldout_long`)."""
    ids = tokenizer(text).input_ids
    ppl, hay = ids[: settings.ppl_tokens], ids[settings.ppl_tokens :]
    tasks = {}
    for name, length, depths, trials in (("passkey", settings.short, settings.short_depths, settings.trials), ("passkey_long", settings.long, settings.long_depths, 1)):
        keys = iter(range(31415, 10**6, 7919))
        tasks[name] = [
            Prompt(name, *passkey_context(tokenizer, hay, length, depth, key, offset=trial * length), (str(key),), depth)
            for trial in range(trials) for depth in depths for key in [next(keys) % 90000 + 10000]
        ]
    tasks["multikey"] = multikey_prompts(tokenizer, hay, settings.short, settings.task_trials)
    tasks["variables"] = variables_prompts(tokenizer, hay, settings.short, settings.task_trials)
    if heldout_wordings:
        tasks["passkey_heldout"] = heldout_passkey_prompts(tokenizer, hay, settings.short, settings.heldout_depths)
        tasks["passkey_heldout_long"] = heldout_passkey_prompts(tokenizer, hay, settings.long, settings.heldout_long_depths)
    return torch.tensor([ppl]), tasks


@dataclass(frozen=True)
class QuantizedPeer:
    """transformers' own `QuantizedCache` with a quantization backend: the peer row (its ratio is its bit width's)."""

    backend: str
    nbits: int
    config: object = field(compare=False, repr=False)

    def build(self, context: int | None = None):  # its memory follows the length by itself
        return QuantizedCache(backend=self.backend, config=self.config, nbits=self.nbits)

    @property
    def label(self) -> str:
        return f"QuantizedCache int{self.nbits} ({self.backend})"


class MatchedSpec:
    """A cache at `target`:1 of *measured* memory at each length a task uses: its knob (`make(knob)`, a keep ratio; more knob
    holds more) is found per length by bisection on the bytes held after that length's reference run (`measured(context, cache)
    -> ratio`), to 4 significant digits rounded down. What the gates keep depends on the text, and a keep ratio holds another
    share of a longer context: one matched at 1.5k tokens holds about 16:1 at 6k where the baselines' budget holds 8:1."""

    def __init__(self, name: str, make: Callable[[float], object], target: float, measured: Callable, low: float = 1e-3, high: float = 1.0, steps: int = 9):
        self.name, self.make, self.target, self.measured = name, make, target, measured
        self.low, self.high, self.steps = low, high, steps  # 9 halvings of 3 decades: within 1.4%
        self.knobs: dict[int, float] = {}

    def knob(self, context: int) -> float:
        """The largest knob found that holds at least `target`:1 after the reference run of `context` tokens (ValueError: none does)."""
        if context not in self.knobs:
            if self._ratio(context, self.low) < self.target:
                raise ValueError(f"{self.name} holds more than 1/{self.target:g} at {context} tokens even at {self.low:g}")
            low, high = self.low, self.high
            if self._ratio(context, high) >= self.target:
                low = high  # the whole knob fits
            for _ in range(self.steps if low < high else 0):
                middle = (low * high) ** 0.5  # geometric: keep ratios span orders of magnitude
                low, high = (middle, high) if self._ratio(context, middle) >= self.target else (low, middle)
            self.knobs[context] = four_digits_down(low)
        return self.knobs[context]

    def _ratio(self, context: int, knob: float) -> float:
        try:
            cache = self.make(knob)
        except ValueError:  # the knob is refused: treat it as too much memory
            return 0.0
        return self.measured(context, cache)

    def build(self, context: int):
        return self.make(self.knob(context))

    @property
    def label(self) -> str:
        return f"{self.name}=" + ",".join(f"{knob:g}@{context}" for context, knob in sorted(self.knobs.items()))


def four_digits_down(value: float) -> float:
    """`value` to 4 significant digits, rounded down (a matched knob printed in full holds what was measured)."""
    exponent = math.floor(math.log10(value)) - 3
    return round(math.floor(round(value / 10**exponent, 6)) * 10**exponent, -exponent)


def reference_prompts(tasks: dict[str, list[Prompt]], settings: Settings) -> dict[int, Prompt]:
    """The prompt on which memory is measured at each pass-key length: the middle one of each."""
    return {settings.tokens(task): tasks[task][len(tasks[task]) // 2] for task in ("passkey", "passkey_long")}


def reference_runs(model, tokenizer, references: dict[int, Prompt], settings: Settings) -> Callable:
    """`measured(context, cache)` for `MatchedSpec`: dense over held bytes of `cache` after the pass-key prompt of that length
    in `references`, fed as the tasks feed it."""

    def measured(context: int, cache) -> float:
        prompt = references[context]
        answer(model, tokenizer, cache, prompt.context, prompt.question, 1, settings.chunk(context))
        held, dense = cache_nbytes(cache)
        return dense / held

    return measured


def peer_grid(backends, config) -> tuple[list, list[str]]:
    """The peer rows of the backends that are installed (int4 and int2), and why the others are left out."""
    grid, skipped = [], []
    for backend in backends:
        if not quantized_cache_backend_installed(backend):
            skipped.append(f"QuantizedCache ({backend}: pip install {QUANTIZED_CACHE_PACKAGES[backend][1]})")
            continue
        grid += [(f"QuantizedCache ({backend})", None, QuantizedPeer(backend, nbits, config)) for nbits in (4, 2)]
    return grid, skipped


def cache_grid(ratios, args, settings: Settings, measured: Callable) -> tuple[list[tuple[str, float | None, object]], list[str]]:
    """(method, target ratio, spec) for every cache to run, and the (method, ratio) pairs left out as infeasible; `measured`
    is `reference_runs`'s, on which the composition's keep ratios are matched."""
    grid, skipped = [("dense", 1.0, CacheSpec("dense"))], []
    if args.only_peers:
        return grid, skipped
    matched = {}
    if args.gate and args.composed_lowrank:
        gate = GateCompressor.from_pretrained(args.gate)
        lowrank = LowRankCompressor.from_pretrained(args.composed_lowrank)
        name = f"compose gate={Path(args.gate).name} lowrank={Path(args.composed_lowrank).name} bits=4 keep_ratio"
        matched["gates x low rank x int4"] = (name, lambda keep: ComposedCache(gate, lowrank, keep_ratio=keep, bits=4))
    progress = tqdm(total=len(ratios) * len(matched), desc="matching keep ratios to the baselines' memory", unit="cache")
    for ratio in ratios:
        grid += [("streamingllm", ratio, CacheSpec("streamingllm", ratio)), ("h2o", ratio, CacheSpec("h2o", ratio))]
        if args.gate:  # as a user builds them: ratio= is a budget met from the length each task feeds on
            gates = CacheSpec.fitted(f"{args.gate}@ratio={ratio:g}")
            try:
                for context in (settings.short, settings.long):
                    gates.build(context)
                grid.append(("gates", ratio, gates))
            except ValueError:
                skipped.append(f"gates {ratio:g}:1 (the exact sink and window alone exceed the budget)")
        for method, (name, make) in matched.items():
            spec = MatchedSpec(name, make, ratio, measured)
            progress.set_postfix_str(f"{method} {ratio:g}:1")
            progress.update()
            try:
                keeps = [spec.knob(context) for context in (settings.short, settings.long)]
            except ValueError:
                skipped.append(f"{method} {ratio:g}:1 (the exact sink and window alone exceed the budget)")
                continue
            if max(keeps) == spec.high:
                skipped.append(f"{method} {ratio:g}:1 (already past the target keeping every token)")
                continue
            grid.append((method, ratio, spec))
    progress.close()
    for path in args.lowrank:
        grid.append((json.loads((Path(path) / "compressor_config.json").read_text())["method"], None, CacheSpec.fitted(path)))
        grid.append(("low rank x int8", None, CacheSpec.fitted(f"compose@lowrank={path},bits=8")))
    grid.append(("int8", None, CacheSpec.fitted("compose@bits=8")))
    for path in args.sidecar:
        grid += [("sidecar", None, CacheSpec.fitted(path)), ("attention matching", None, CacheSpec.fitted(f"{path}@merge=attention_matching"))]
    return grid, skipped


@torch.no_grad()
def run(model, tokenizer, grid, ppl_ids, tasks: dict[str, list[Prompt]], settings: Settings) -> list[Row]:
    rows, references = [], reference_prompts(tasks, settings)
    progress = tqdm(total=len(grid) * (1 + sum(map(len, tasks.values()))), desc="benchmark", unit="run")
    for method, target, spec in grid:
        row, started = Row(method, spec.label, target), time.perf_counter()
        progress.set_postfix_str(f"{spec.label}: perplexity")
        perplexity = streaming_perplexity(model, ppl_ids.to(model.device), spec.build(settings.tokens("ppl")))
        row.scores["ppl"], row.ratios["ppl"] = perplexity.perplexity, perplexity.dense_nbytes / perplexity.nbytes
        progress.update()
        for task, task_prompts in tasks.items():
            results, context = [], settings.tokens(task)
            for prompt in task_prompts:
                progress.set_postfix_str(f"{spec.label}: {task}")
                cache = spec.build(context)
                results.append(score(prompt, answer(model, tokenizer, cache, prompt.context, prompt.question, 16, settings.chunk(context))))
                if prompt is references[settings.short]:
                    row.nbytes, row.dense_nbytes = cache_nbytes(cache)
                elif prompt is references[settings.long]:
                    held, dense = cache_nbytes(cache)
                    row.ratios[task] = dense / held
                if task == "passkey" and prompt.depth is not None:
                    row.scores.setdefault("passkey_by_depth", {}).setdefault(f"{prompt.depth:g}", []).append(results[-1])
                progress.update()
            row.scores[task] = statistics.mean(results)
        row.scores["passkey_by_depth"] = {depth: statistics.mean(hits) for depth, hits in row.scores.get("passkey_by_depth", {}).items()}
        row.seconds = time.perf_counter() - started
        rows.append(row)
        tqdm.write(f"{spec.label}: ratio {row.measured_ratio:.2f}, " + ", ".join(f"{k} {v:.3f}" for k, v in row.scores.items() if isinstance(v, float)))
    progress.close()
    return rows


TASK_COLUMNS = (("ppl", "PPL@{ppl}"), ("passkey", "passkey@{short}"), ("passkey_long", "passkey@{long}"), ("multikey", "multi-key@{short}"), ("variables", "var. tracking@{short}"))


def table(rows: list[Row], settings: Settings) -> str:
    ratios = f"measured ratio @{settings.ppl_tokens} / @{settings.short} / @{settings.long}"
    header = ["method", "cache", "target", ratios, "held KiB"] + [title.format(ppl=settings.ppl_tokens, short=settings.short, long=settings.long) for _, title in TASK_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: (r.target or r.measured_ratio, r.method)):
        ratios = " / ".join(f"{ratio:.2f}" if ratio is not None else "-" for ratio in (row.ratios.get("ppl"), row.measured_ratio, row.ratios.get("passkey_long")))
        cells = [row.method, row.cache, "-" if row.target is None else f"{row.target:g}:1", ratios, f"{row.nbytes / 1024:.0f}" if row.nbytes else "-"]
        cells += ["-" if key not in row.scores else f"{row.scores[key]:.2f}" for key, _ in TASK_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], settings: Settings, path: Path) -> None:
    """One panel per task: score against measured ratio, one line per method."""
    fig, axes = plt.subplots(1, len(TASK_COLUMNS), figsize=(5 * len(TASK_COLUMNS), 4.2))
    methods = list(dict.fromkeys(row.method for row in rows))
    for axis, (key, title) in zip(axes, TASK_COLUMNS):
        for index, method in enumerate(methods):
            points = sorted((row.measured_ratio, row.scores[key]) for row in rows if row.method == method and key in row.scores)
            if points:
                style = "--" if method.startswith("kvpress") else "-"
                axis.plot(*zip(*points), style, marker="o", label=method, color=plt.cm.tab20(index % 20))
        axis.set_xscale("log", base=2)
        axis.set_xlabel("measured compression ratio (dense bytes / held bytes)")
        axis.set_title(title.format(ppl=settings.ppl_tokens, short=settings.short, long=settings.long) + (" (lower is better)" if key == "ppl" else ""))
        if key == "ppl":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(model) -> dict:
    device = torch.cuda.get_device_name() if model.device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__, "kvcompress": kvcompress.__version__, "model": model.config.name_or_path, "dtype": str(model.dtype)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--ratios", nargs="*", type=float, default=[2, 4, 8, 16, 32])
    parser.add_argument("--gate", default=None, metavar="DIR", help="gate compressor (kvcompress calibrate --method gate)")
    parser.add_argument("--lowrank", nargs="*", default=[], metavar="DIR", help="PCA / KVSplice compressors (each alone and x int8)")
    parser.add_argument("--composed-lowrank", default=None, metavar="DIR", help="low-rank compressor for gates x low rank x int4")
    parser.add_argument("--sidecar", nargs="*", default=[], metavar="DIR")
    parser.add_argument("--kvpress", default=None, metavar="JSON", help="results of benchmarks/kvpress_runner.py to merge in")
    parser.add_argument("--peers", nargs="*", default=[], choices=sorted(QUANTIZED_CACHE_PACKAGES), help="transformers' QuantizedCache with these backends")
    parser.add_argument("--only-peers", action="store_true", help="run only dense and the --peers")
    parser.add_argument("--merge", nargs="*", default=[], metavar="JSON", help="quality.json files of other runs whose rows join the tables")
    parser.add_argument("--export-prompts", default=None, metavar="JSON", help="write the prompts for kvpress_runner.py and stop")
    parser.add_argument("--output", default="docs/benchmark")
    add_update_docs(parser, "benchmarks.md", "quality")
    parser.add_argument("--quick", action="store_true", help="a small run (2 ratios, fewer prompts, short long-context) to check the pipeline")
    parser.add_argument("--render", default=None, metavar="JSON", help="only re-render tables, plot and docs section from a saved quality.json")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render, args.output, args.update_docs, args.merge, args.kvpress)
    settings = Settings() if not args.quick else Settings(ppl_tokens=256, short=512, long=1024, short_depths=(0.5,), long_depths=(0.5,), trials=1, task_trials=1)
    ratios = args.ratios if not args.quick else args.ratios[:2]

    model, tokenizer = kvcompress.load_model(args.model, device=args.device)
    ppl_ids, tasks = prompts(tokenizer, heldout_text(), settings)
    if args.export_prompts:
        payload = {"settings": asdict(settings), "ratios": ratios, "ppl_ids": ppl_ids[0].tolist(), "tasks": {name: [asdict(p) for p in ps] for name, ps in tasks.items()}}
        Path(args.export_prompts).write_text(json.dumps(payload))
        print(f"wrote {args.export_prompts}")
        return
    grid, skipped = cache_grid(ratios, args, settings, reference_runs(model, tokenizer, reference_prompts(tasks, settings), settings))
    peers, left_out = peer_grid(args.peers, model.config)
    started = time.perf_counter()
    rows = run(model, tokenizer, grid + peers, ppl_ids, tasks, settings)
    env = environment(model) | {"minutes": round((time.perf_counter() - started) / 60, 1)}
    rows, env = merged(*with_kvpress(rows, env, args.kvpress), args.merge, settings)
    write_outputs(rows, settings, env, skipped + left_out, Path(args.output), args.update_docs)


def with_kvpress(rows: list[Row], env: dict, path: str | None) -> tuple[list[Row], dict]:
    """`rows` with those of `benchmarks/kvpress_runner.py`'s results at `path` (when given), its environment named as the kvpress rows'."""
    if path is None:
        return rows, env
    external = json.loads(Path(path).read_text())
    return rows + [Row(**row) for row in external["rows"]], env | {"kvpress": external["environment"]}


def merged(rows: list[Row], env: dict, paths, settings: Settings) -> tuple[list[Row], dict]:
    """`rows` with those of the quality.json files at `paths` that are not dense (each run has its own), and their environments."""
    for path in paths:
        other = json.loads(Path(path).read_text())
        if other["settings"] != json.loads(json.dumps(asdict(settings))):  # as saved (tuples become lists)
            raise ValueError(f"{path} was measured with other settings ({other['settings']}); merge runs of the same prompts only.")
        rows = rows + [Row(**row) for row in other["rows"] if row["method"] != "dense"]
        methods = sorted({row["method"] for row in other["rows"] if row["method"] != "dense"})
        env = env | {"merged": env.get("merged", []) + [other["environment"] | {"methods": methods}]}
    return rows, env


def write_outputs(rows: list[Row], settings: Settings, env: dict, skipped: list[str], output: Path, page: str | None) -> None:
    """quality.json, quality.md (the docs section), the plot, and the docs block when asked."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "quality.json").write_text(json.dumps({"environment": env, "settings": asdict(settings), "skipped": skipped, "rows": [asdict(r) for r in rows]}, indent=1))
    plot(rows, settings, output / "quality_vs_compression.png")
    where = f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['model']} in {env['dtype'].removeprefix('torch.')}"
    kvpress_note = f"; kvpress rows: {env['kvpress']['device']}, kvpress {env['kvpress']['kvpress']}, transformers {env['kvpress']['transformers']}" if "kvpress" in env else ""
    kvpress_note += "".join(
        f"; {', '.join(other['methods'])} rows: another run ({other['device']}, torch {other['torch']}, transformers {other['transformers']}; {other['minutes']} min)"
        for other in env.get("merged", [])
    )
    lines = [
        f"Generated by `python benchmarks/quality.py` ({where}; {env['minutes']} min{kvpress_note}).",
        f"Scores are shares of answers found ({len(settings.short_depths) * settings.trials} pass-key prompts at {settings.short} tokens, {len(settings.long_depths)} at "
        f"{settings.long}, {settings.task_trials} multi-key and {settings.task_trials} variable-tracking prompts at {settings.short}); PPL is streaming perplexity on "
        f"{settings.ppl_tokens} held-out tokens. The measured ratio is dense bytes over held bytes at the end of the perplexity text, of a "
        f"{settings.short}-token and of a {settings.long}-token pass-key prompt ('-': not measured by that run); perplexity streams at the {settings.short}-token setting.",
        "", table(rows, settings), "",
        f"Left out: {', '.join(skipped) or 'none'}.", "",
    ]

    def image(beside: Path) -> str:  # the plot's link, relative to the page that shows it
        return f"![quality vs compression]({Path(os.path.relpath(output / 'quality_vs_compression.png', beside)).as_posix()})"

    section = "\n".join([*lines, image(output)])
    (output / "quality.md").write_text(section + "\n")
    print("\n" + section)
    if page:
        update_block(Path(page), "quality", "\n".join([*lines, image(Path(page).parent)]))


def render(path: str, output: str, page: str | None, merge=(), kvpress: str | None = None) -> None:
    """Tables, plot and docs section again from a saved quality.json, with the rows of the `merge` files and of kvpress's results
    (no model runs)."""
    data = json.loads(Path(path).read_text())
    rows, env = merged(*with_kvpress([Row(**row) for row in data["rows"]], data["environment"], kvpress), merge, Settings(**data["settings"]))
    skipped = data["skipped"] + [entry for other in merge for entry in json.loads(Path(other).read_text())["skipped"]]
    write_outputs(rows, Settings(**data["settings"]), env, skipped, Path(output), page)


if __name__ == "__main__":
    main()
