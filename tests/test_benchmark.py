"""The benchmark's generated tasks (on the default model's tokenizer) and its rendering of tables, plot and docs block."""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress.calibration.recall import SUBJECTS
from kvcompress.evaluation.tasks import PHRASINGS, Prompt, heldout_passkey_prompts, hide, multikey_prompts, score, variables_prompts

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402
from doc_block import DOCS, add_update_docs, markers, update_block  # noqa: E402

# each generated block, the docs page it lives in (where --update-docs alone writes it), and the script that writes it
BLOCKS = {
    "quality": "benchmarks.md", "gpu": "benchmarks.md", "decode": "benchmarks.md", "pretrained": "pretrained.md", "calibration-cost": "calibration.md",
    "keep-and-merge": "methods.md",
}
CALIBRATION_RUNS = [DOCS / "benchmark" / f"calibration_{model}_cuda.json" for model in ("default", "llama-8b-shape")]


def stale(page: Path, *blocks: str) -> None:
    """Replace what the benchmarks generated in `page` by a placeholder, as before a re-run."""
    for block in blocks:
        update_block(page, block, "stale")


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    from kvcompress.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.mark.model
def test_tasks_hide_their_statements_at_the_asked_length(tokenizer):
    from kvcompress.corpus import heldout_text

    hay = tokenizer(heldout_text()).input_ids
    for prompt in multikey_prompts(tokenizer, hay, 1024, trials=3) + variables_prompts(tokenizer, hay, 1024, trials=2):
        total = len(tokenizer(prompt.context + prompt.question).input_ids)
        assert abs(total - 1024) <= 8
        assert all(answer in prompt.context and answer not in prompt.question for answer in prompt.answers)
    heldout = heldout_passkey_prompts(tokenizer, hay, 1024, (0.2, 0.8))
    assert len(heldout) == 2 * len(PHRASINGS) and len({prompt.question for prompt in heldout}) == len(PHRASINGS)
    for prompt in heldout:  # one number, stated once where asked, in a wording that is neither the evaluator's nor calibration's
        (value,) = prompt.answers
        assert abs(len(tokenizer(prompt.context + prompt.question).input_ids) - 1024) <= 8 and prompt.context.count(value) == 1
        assert abs(prompt.context.index(value) / len(prompt.context) - prompt.depth) < 0.1 and value not in prompt.question
    for intro, statement, question in PHRASINGS:
        assert "pass key" not in (intro + statement + question).lower() and "What is the" not in question
        assert not any(subject in intro + statement + question for subject in SUBJECTS)
    chain = variables_prompts(tokenizer, hay, 1024, trials=1, hops=3)[0]
    first, second, third = chain.answers
    assert chain.context.index(f"VAR {first} = ") < chain.context.index(f"VAR {second} = VAR {first}.") < chain.context.index(f"VAR {third} = VAR {second}.")
    with pytest.raises(ValueError, match="Cannot build a 4096-token prompt from 100 haystack tokens"):
        hide(tokenizer, hay[:100], 4096, "intro", [(0.5, "x")], "question")


def test_scores_are_shares_of_expected_answers_found():
    prompt = Prompt("variables", "", "", ("ABCDE", "FGHIJ"))
    assert score(prompt, " ABCDE, VAR KLMNO") == 0.5 and score(prompt, "FGHIJ ABCDE") == 1.0 and score(prompt, "") == 0.0


def test_render_writes_tables_plot_and_replaces_only_the_docs_block(tmp_path):
    rows = [
        quality.Row("dense", "dense", 1.0, {"ppl": 17.7, "passkey": 1.0, "passkey_long": 1.0, "multikey": 0.5, "variables": 0.5}, 100, 100),
        quality.Row("h2o", "h2o 8:1", 8.0, {"ppl": 29.2, "passkey": 0.0, "passkey_long": 0.0, "multikey": 0.0, "variables": 0.1}, 13, 100, ratios={"ppl": 7.5, "passkey_long": 7.7}),
        quality.Row("kvpress SnapKVPress", "kvpress SnapKVPress 8:1", 8.0, {"passkey": 0.0, "passkey_long": 0.0, "multikey": 0.0, "variables": 0.0}, 14, 100),
    ]
    environment = {"device": "CPU", "torch": "2", "transformers": "5", "model": "m", "dtype": "torch.float32", "minutes": 1.0}
    saved = tmp_path / "in.json"
    saved.write_text(json.dumps({"environment": environment, "settings": quality.asdict(quality.Settings()), "skipped": ["gates 32:1 (why)"], "rows": [quality.asdict(r) for r in rows]}))
    page = tmp_path / "benchmarks.md"
    start, end = markers("quality")
    page.write_text(f"before\n{start}\nold table\n{end}\nafter\n")
    quality.render(saved, tmp_path / "out", page)
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old table" not in text
    assert "| h2o | h2o 8:1 | 8:1 | 7.50 / 7.69 / 7.70 |" in text  # at the end of the perplexity text, of the short and of the long prompt
    assert "| kvpress SnapKVPress | kvpress SnapKVPress 8:1 | 8:1 | - / 7.14 / - | 0 | - |" in text  # a run that measured only the short one
    assert "Left out: gates 32:1 (why)." in text
    assert (tmp_path / "out" / "quality_vs_compression.png").stat().st_size > 10_000
    (tmp_path / "bare.md").write_text("no markers")
    with pytest.raises(ValueError, match="has no <!-- benchmark:quality:start -->"):
        update_block(tmp_path / "bare.md", "quality", "x")


def test_each_block_lives_in_its_docs_page_where_update_docs_alone_writes_it():
    for block, page in BLOCKS.items():
        start, end = markers(block)
        text = (DOCS / page).read_text()
        assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end), (block, page)
        parser = argparse.ArgumentParser()
        add_update_docs(parser, page, block)
        assert parser.parse_args(["--update-docs"]).update_docs == str(DOCS / page)
        assert parser.parse_args(["--update-docs", "elsewhere.md"]).update_docs == "elsewhere.md"
        assert parser.parse_args([]).update_docs is None  # a run writes no docs unless asked
    assert "benchmark:" not in (ROOT / "README.md").read_text()  # the README holds no generated block


def test_quality_and_gpu_blocks_regenerate_byte_for_byte_from_the_saved_results(tmp_path):
    """--render of the saved results rewrites the stale blocks of a copy of docs/benchmarks.md back to the page as committed."""
    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "benchmarks.md"
    shutil.copy(DOCS / "benchmarks.md", page)
    shutil.copytree(DOCS / "benchmark" / "gpu-parts", docs / "benchmark" / "gpu-parts")
    stale(page, "quality", "gpu")
    assert page.read_text() != (DOCS / "benchmarks.md").read_text()

    quality.main(["--render", str(DOCS / "benchmark" / "quality.json"), "--output", str(docs / "benchmark"), "--update-docs", str(page)])
    assert (docs / "benchmark" / "quality.md").read_text() == (DOCS / "benchmark" / "quality.md").read_text()  # its plot linked beside it
    parts = [str(docs / "benchmark" / "gpu-parts" / f"{part}.json") for part in ("throughput", "quantized-peers-h200", "longest-dense-h200", "longest-pca-h200")]
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--render", *parts, "--output", str(tmp_path / "gpu"), "--update-docs", str(page)],
        check=True, capture_output=True, timeout=300,
    )
    assert page.read_text() == (DOCS / "benchmarks.md").read_text()


def test_calibration_cost_block_regenerates_from_the_saved_runs(tmp_path):
    """The GPU calibration table of docs/calibration.md is what --render makes of the saved runs: every method, the
    default model's held-out check beside its time and memory, and the 8B/70B projection of the 8B-shaped run."""
    page = tmp_path / "calibration.md"
    shutil.copy(DOCS / "calibration.md", page)
    stale(page, "calibration-cost")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "calibration_cost.py"), "--render", *map(str, CALIBRATION_RUNS), "--update-docs", str(page)],
        check=True, capture_output=True, timeout=300,
    )
    assert page.read_text() == (DOCS / "calibration.md").read_text()
    for path in CALIBRATION_RUNS:
        runs = json.loads(path.read_text())["runs"]
        assert [run["method"] for run in runs] == ["pca", "kvsplice", "gate", "sidecar"]
        assert all(run["peak_gpu_memory_bytes"] > 0 and run["calibration_seconds"] > 0 for run in runs)


def test_keep_and_merge_block_regenerates_from_the_saved_run(tmp_path):
    """The keep-and-merge ablation in docs/methods.md is what --render makes of docs/benchmark/keep_and_merge.json, whose rows
    hold what the table claims: the caches compared at the same measured memory (within 10%), and every task scored."""
    page = tmp_path / "methods.md"
    shutil.copy(DOCS / "methods.md", page)
    stale(page, "keep-and-merge")
    saved = DOCS / "benchmark" / "keep_and_merge.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "keep_and_merge.py"), "--render", str(saved), "--update-docs", str(page)], check=True, capture_output=True, timeout=300)
    assert page.read_text() == (DOCS / "methods.md").read_text()
    rows = json.loads(saved.read_text())["rows"]
    for row in rows:
        assert all(0 <= row[task] <= 1 for task in ("passkey", "passkey_heldout", "multikey", "passkey_long", "passkey_heldout_long")) and row["ppl"] > 1
        if not row["cache"].startswith(("dense", "gates'")):  # the ablation rows hold more memory on purpose
            assert abs(row["measured_ratio"] / row["target"] - 1) < 0.1, row


def test_the_gpu_benchmark_runs_its_pipeline_on_a_tiny_model(tmp_path):
    """--tiny builds every synthetic artifact for the model's shape and times caches on the CPU (it measures nothing)."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--tiny", "--context", "1024", "--steps", "4", "--repeats", "1",
         "--only", "dense, batch 8, packed", "gates", "pca", "sidecar", "keep-and-merge", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.loads((tmp_path / "gpu.json").read_text())
    runs = {r["cache"].split(" ")[0]: r for r in saved["runs"]}
    assert {"dense,", "gates", "pca", "sidecar", "keep-and-merge"} <= set(runs)
    assert all(r["tokens_per_second"] > 0 and r["kv_bytes"] > 0 and not r["error"] for r in saved["runs"])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2**25))
def test_the_longest_context_search_brackets_the_limit_within_a_sixteenth_and_resumes_from_a_bracket(limit):
    """Doubling, then bisection: what it returns fits and what fits beyond it is under 1/16 of it; resumed from the bracket
    its doubling reached, it probes only the bisection's contexts and finds the same."""
    import gpu_throughput

    probes = []

    def fits(model, factory, tokens, chunk):
        probes.append(tokens)
        return tokens <= limit

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_throughput, "fits", fits)
        found = gpu_throughput.longest_context(None, None, start=65536)
        if limit < 65536:
            assert found == 0 and probes == [65536]
            return
        assert found <= limit and (limit >= 2**25 or limit - found < max(found / 16, 16384))  # contexts are whole chunks of 16384
        doubled = [tokens for tokens in probes if tokens & (tokens - 1) == 0]
        bracket = (max(t for t in doubled if t <= limit), min((t for t in doubled if t > limit), default=2 * max(doubled)))
        bisected, probes[:] = probes[len(doubled):], []
        assert gpu_throughput.longest_context(None, None, start=65536, bracket=bracket) == found and probes == bisected


def test_resuming_the_longest_context_search_needs_one_cache_and_an_ordered_bracket():
    for argv in (["--longest", "pca", "--longest-between", "8", "4"], ["--longest", "pca", "dense", "--longest-between", "4", "8"], ["--longest-between", "4", "8"]):
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), *argv], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "resumes the search of one cache" in run.stderr, argv


def test_the_kernel_ab_benchmark_runs_its_pipeline_on_a_tiny_model():
    """--tiny fills the named caches and times them with the kernel patched off and on (on the CPU both are PyTorch's)."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_ab.py"), "tail_attention", "--tiny", "--context", "1024", "--steps", "2", "--runs", "1", "--only", "pca"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if "tail_attention off" in line]
    assert [line.split(": tail_attention")[0] for line in lines] == ["dense, batch 8, packed GQA", "pca rank 7 (8:1)"] and "1.00x)" in lines[0]
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_ab.py"), "sidecar", "--only", "pca"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "invalid choice: 'sidecar'" in refused.stderr


def test_the_version_ab_benchmark_runs_two_versions_in_one_process_on_a_tiny_model(tmp_path):
    """--tiny imports a second copy of the package as the earlier version, fills a cache of each and times them alternating;
    a directory without the package is refused."""
    shutil.copytree(ROOT / "kvcompress", tmp_path / "before" / "kvcompress", ignore=shutil.ignore_patterns("pretrained", "__pycache__"))
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "version_ab.py"), str(tmp_path / "before"), "--tiny", "--context", "1024", "--steps", "2", "--runs", "2", "--only", "h2o 8:1"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("h2o 8:1, ")]
    assert [row.split(": ")[0] for row in rows] == ["h2o 8:1, before", "h2o 8:1, after"]
    assert all(re.search(r": \d+ tokens/s \(\d+\.\d\dx packed dense\); runs \[\d+, \d+\]$", row) for row in rows), rows
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "version_ab.py"), str(tmp_path), "--tiny", "--only", "h2o 8:1"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "holds no kvcompress/ package" in refused.stderr


def test_runs_merge_into_one_table_only_when_they_share_the_prompts(tmp_path):
    """--merge adds another run's rows (not its dense row) and names its environment; a run of other settings is refused."""
    environment = {"device": "CPU (x86_64, 2 threads)", "torch": "2.13.0", "transformers": "5.24.0", "kvcompress": "0.1.0", "model": "SmolLM2-135M-Instruct", "dtype": "torch.float32", "minutes": 3.0}
    peer = quality.Row("QuantizedCache (quanto)", "QuantizedCache int4 (quanto)", None, {"ppl": 18.0, "passkey": 1.0}, 20, 100)
    dense = quality.Row("dense", "dense", 1.0, {"ppl": 17.7, "passkey": 1.0}, 100, 100)
    other = tmp_path / "peers.json"
    other.write_text(json.dumps({"environment": environment, "settings": quality.asdict(quality.Settings()), "skipped": [], "rows": [quality.asdict(dense), quality.asdict(peer)]}))
    rows, env = quality.merged([dense], environment | {"device": "GPU"}, [other], quality.Settings())
    assert [row.cache for row in rows] == ["dense", "QuantizedCache int4 (quanto)"]
    assert env["merged"][0]["methods"] == ["QuantizedCache (quanto)"] and env["merged"][0]["device"].startswith("CPU")
    with pytest.raises(ValueError, match="was measured with other settings"):
        quality.merged([dense], environment, [other], quality.Settings(trials=1))


def test_a_matched_keep_ratio_holds_the_target_at_each_length_it_is_asked_for():
    """Bisection per length on a measurement where a fixed 100-token part and the kept share make the memory: the knob found
    (4 digits, rounded down) holds the target there and is within the bisection's 1.4% of the largest that does, a longer
    context gets a larger share, and a length where the fixed part alone exceeds the budget is refused."""
    calls = []

    def measured(context, keep):
        calls.append(context)
        return context / (100 + keep * (context - 100))

    spec = quality.MatchedSpec("gates", lambda keep: keep, 8, measured)
    for context in (1536, 6144):
        keep, largest = spec.knob(context), (context / 8 - 100) / (context - 100)
        assert measured(context, keep) >= 8 and keep > largest / 1.014 and f"{keep:g}" == f"{keep:.4g}"
    before = len(calls)
    assert spec.knob(6144) > spec.knob(1536) and len(calls) == before  # each length matched once, then remembered
    assert spec.build(6144) == spec.knobs[6144] and spec.label == f"gates={spec.knobs[1536]:g}@1536,{spec.knobs[6144]:g}@6144"
    with pytest.raises(ValueError, match="holds more than 1/8 at 512 tokens"):
        spec.knob(512)
    assert quality.MatchedSpec("gates", lambda keep: keep, 1, measured).knob(6144) == 1.0  # keeping everything fits: no bisection


def test_a_refused_knob_counts_as_too_much_memory_but_a_failing_measurement_is_raised():
    def refuse_small(keep):
        if keep < 0.01:
            raise ValueError("refused")
        return keep

    spec = quality.MatchedSpec("gates", refuse_small, 8, lambda context, keep: context / (100 + keep * (context - 100)))
    with pytest.raises(ValueError, match="holds more than 1/8"):
        spec.knob(1536)  # the smallest knob is refused: nothing reaches the target
    def broken(context, keep):
        raise ValueError("the measurement broke")

    with pytest.raises(ValueError, match="the measurement broke"):  # not taken for a knob that holds too much
        quality.MatchedSpec("gates", lambda keep: keep, 8, broken).knob(1536)


@pytest.mark.model
def test_the_ratio_knob_benchmark_measures_what_ratio_asks_at_each_length(default_model, monkeypatch, capsys):
    """Each row is the cache a user gets from ``ratio=`` at that context, fed the reference prompt of that length."""
    import ratio_knob

    from kvcompress import GatedCache

    monkeypatch.setattr(ratio_knob.kvcompress, "load_model", lambda device=None: default_model)
    ratio_knob.main(["--ratios", "8"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 8 |")]
    assert [row[1] for row in rows] == ["1536", "6144"]
    for _, context, keep, measured in rows:
        assert float(keep) == pytest.approx(GatedCache.from_pretrained("kvcompress/smollm2-135m-instruct-gate", ratio=8, context=int(context)).keep_ratio, abs=1e-4)
        assert 7 < float(measured.rstrip(" |")) < 9  # about the 8:1 asked: a budget, whatever the text


def test_merging_evicted_tokens_into_kept_slots_keeps_every_tokens_mass_and_off_changes_nothing():
    """benchmarks/merge_into_kept.py: at threshold -1 every evicted token joins a kept slot, so each head's slots stand for
    every token seen (exp(bias) counts them), the kept tokens being the gates' own; off, the cache is the gates' exactly."""
    import merge_into_kept
    import torch
    from conftest import prompt_ids, tiny_model
    from test_gates import tiny_gates

    from kvcompress import GatedCache, cache_kwargs

    model = tiny_model("llama")
    gates, ids = tiny_gates(model), prompt_ids(100)

    def filled(threshold, variant="values+mass"):
        cache = GatedCache(gates, ratio=4, context=100)
        cache.encoding = merge_into_kept.WithBias()
        with merge_into_kept.merging(threshold, variant):
            feed(cache)
        return cache

    @torch.no_grad()
    def feed(cache):  # a prefill past the window, so that the first tokens that leave it find a kept slot, then chunks
        for start, end in ((0, 30), *((start, start + 10) for start in range(30, 100, 10))):
            model(input_ids=ids[:, start:end], **cache_kwargs(cache), use_cache=True)

    plain, merged, averaged = filled(None), filled(-1.0), filled(-1.0, "values+keys")
    first = plain.layers[0], merged.layers[0], averaged.layers[0]  # its keys come from the embeddings, which no merge changes
    assert torch.equal(first[1].store["token_ids"], first[0].store["token_ids"]) and torch.equal(first[1].store["keys"], first[0].store["keys"])
    assert not torch.equal(first[1].store["values"], first[0].store["values"]) and not torch.equal(first[2].store["keys"], first[0].store["keys"])
    for layer, (mass, mean) in enumerate(zip(merged.layers, averaged.layers)):
        exact, held = mass.store["token_ids"] >= 0, (mass.tail["token_ids"] >= 0).sum(-1)
        counted = mass.store["bias"].exp().where(exact, 0).sum(-1) + held
        if layer == 0:  # its budget kept a slot from the first hand-off on: every token seen, once
            assert torch.allclose(counted, torch.full_like(counted, 100.0), atol=1e-3)
        assert bool((counted <= 100.001).all() and (counted > exact.sum(-1) + held).all())  # elsewhere those before a first slot are lost
        assert not bool(mean.store["bias"].any())  # without mass: no bias
    assert merge_into_kept.CompressedLayer._compress is type(plain.layers[0])._compress  # the engine is restored
    reference = GatedCache(gates, ratio=4, context=100)
    feed(reference)
    assert all(torch.equal(a.store["values"], b.store["values"]) for a, b in zip(plain.layers, reference.layers))


def test_lowering_the_merged_slots_bias_changes_only_their_bias():
    """benchmarks/merged_slot_value.py: a shift lowers the logit bias of keep-and-merge's merged slots by exactly that much,
    and holds the same slots (the same memory); at shift 0 the cache is the plain one."""
    import merged_slot_value
    import torch
    from conftest import prompt_ids, tiny_model
    from test_gates import tiny_gates
    from test_sidecar import untrained_sidecar

    from kvcompress import SidecarCache, cache_kwargs
    from kvcompress.slots import SYNTHESIZED

    model = tiny_model("llama")
    compressor, ids = untrained_sidecar(model).with_gates(tiny_gates(model)), prompt_ids(120)

    @torch.no_grad()
    def filled(shift):
        cache = SidecarCache(compressor, ratio=2, context=120, merge="attention_matching")
        if shift is not None:
            merged_slot_value.shifted(cache, shift)
        model(input_ids=ids[:, :100], **cache_kwargs(cache))  # a prefill attends exactly; the next tokens see the merged slots
        return cache, model(input_ids=ids[:, 100:], **cache_kwargs(cache)).logits

    (plain, plain_logits), (_, unshifted_logits), (lowered, lowered_logits) = filled(None), filled(0.0), filled(5.0)
    assert torch.equal(unshifted_logits, plain_logits) and not torch.allclose(lowered_logits, plain_logits)
    before, after = plain.layers[0], lowered.layers[0]  # its keys come from the embeddings, which no shift changes
    token_ids = before.store["token_ids"]
    assert torch.equal(after.store["token_ids"], token_ids) and bool((token_ids == SYNTHESIZED).any())
    difference = (before.store["bias"] - after.store["bias"])[token_ids != -1]
    assert torch.allclose(difference, 5.0 * (token_ids[token_ids != -1] == SYNTHESIZED), atol=1e-5)
    assert lowered.nbytes() == plain.nbytes()
