"""The inference-efficiency study: the latency/memory grid over batch size x output length on the CPU,
out-of-memory cells (a real memory limit, and a simulated GPU out-of-memory), the largest-batch
search, the tables and plots of results.md, and the generation samples."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from matplotlib import colors as mcolors
from matplotlib import image as mimage
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from data.config import ConfigError, load_config
from pruning.layers import remove_blocks
from training.evaluation.config import EvalConfig, SamplingSection
from training.evaluation.grid import largest_batch
from training.evaluation.latency import measure_generation, prompt_ids
from training.evaluation.memory import CPU_RESIDENT, GIB, MemoryMeter
from training.evaluation.plots import REFERENCE_COLOR, latency_by_batch_figure, latency_throughput_figure
from training.evaluation.run import evaluate_models
from training.evaluation.tables import _markdown_cell

PROMPTS = ["The Leaning Tower of Pisa is known for", "Neural network pruning is defined as"]
BUDGET = 440  # simulated device: batch x blocks x (input + output tokens) must stay within it


def simulated_device(real_generate):
    """generate() that runs out of memory as a GPU would once batch x blocks x tokens exceeds BUDGET."""

    def generate(self, inputs=None, **kwargs):
        ids = inputs if inputs is not None else kwargs["input_ids"]
        if ids.shape[0] * self.config.num_hidden_layers * (ids.shape[1] + kwargs["max_new_tokens"]) > BUDGET:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_generate(self, inputs, **kwargs)

    return generate


@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine lose much to it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dirs):
    """One evaluation of an 8-block model and its 6-block pruning on the simulated device: grid M in
    {1, 2, 4} x L in {2, 4}, the largest-batch search, two samples. Returns (output dir, results)."""
    root = tmp_path_factory.mktemp("efficiency")
    original, pruned = tiny_model_dirs["llama"], root / "pruned"
    model = AutoModelForCausalLM.from_pretrained(original)
    remove_blocks(model, [2, 5])
    model.save_pretrained(pruned)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(original / name, pruned / name)
    config = load_config(EvalConfig, None, [
        f"models=[{{name: original, path: {original}}}, {{name: pruned, path: {pruned}}}]",
        f"output_dir={root / 'out'}", "zeroshot.tasks=[]", "perplexity.sets=[]", "device=cpu",
        "latency.batch_sizes=[4, 1, 2]", "latency.new_tokens=[4, 2]", "latency.warmup=0", "latency.runs=2",
        "latency.max_batch=true", "latency.memory_limit_gb=16",  # the limit is far away: the budget decides
        f"samples.prompts={json.dumps(PROMPTS)}", "samples.max_new_tokens=6"])
    with one_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(LlamaForCausalLM, "generate", simulated_device(LlamaForCausalLM.generate))
        output = evaluate_models(config)
    return output, json.loads((output / "results.json").read_text())


def cells(row: dict) -> dict:
    return {(c["batch_size"], c["new_tokens"]): c for c in row["latency"]}


def test_the_grid_measures_every_cell_and_records_out_of_memory(study):
    _, results = study
    original, pruned = results["models"]
    assert list(cells(original)) == [(1, 4), (2, 4), (4, 4), (1, 2), (2, 2), (4, 2)]  # each L in the recipe's order
    for key, cell in cells(pruned).items():  # 6 blocks x 4 x 16 = 384: the pruned model fits everywhere
        assert cell["status"] == "ok", key
        assert len(cell["times_s"]) == 2 and cell["latency_s"] == pytest.approx(np.mean(cell["times_s"]))
        assert cell["tokens_per_s"] == pytest.approx(np.mean([key[0] * key[1] / t for t in cell["times_s"]]))
        assert cell["input_tokens"] == 12 and cell["do_sample"] is True  # the official protocol
        assert cell["memory"] == CPU_RESIDENT and 0.05 < cell["peak_memory_gb"] < 16
    for new_tokens in (2, 4):  # 8 blocks x 4 x (12 + L) > 440: the original runs out of memory at batch 4
        assert cells(original)[(2, new_tokens)]["status"] == "ok"
        oom = cells(original)[(4, new_tokens)]
        assert oom["status"] == "oom" and "out of memory" in oom["oom"] and "latency_s" not in oom


def test_the_search_finds_the_largest_batch_per_length(study):
    _, results = study
    original, pruned = results["models"]
    frontier = {f["new_tokens"]: f for f in original["max_batch"]}
    assert frontier[4]["max_batch"] == 3 and frontier[4]["first_oom"] == 4  # 3 x 8 x 16 = 384, 4 x 8 x 16 = 512
    assert frontier[4]["probes"] == [[3, "ok"]]  # the grid already saw 2 fit and 4 fail
    assert frontier[2]["max_batch"] == 3  # 3 x 8 x 14 = 336, 4 x 8 x 14 = 448
    frontier = {f["new_tokens"]: f for f in pruned["max_batch"]}
    assert (frontier[2]["max_batch"], frontier[4]["max_batch"]) == (5, 4)  # 440 // 84, 440 // 96
    assert frontier[2]["probes"] == [[8, "oom"], [6, "oom"], [5, "ok"]]


def test_results_md_has_the_memory_table_the_frontier_and_the_samples(study, tiny_model_dirs):
    output, results = study
    text = (output / "results.md").read_text()
    assert "| model | params | blocks | latency s (bs 1, L 2) | tokens/s (bs 1, L 2) | latency s (bs 1, L 4) |" in text
    memory = text[text.index("### Peak memory"):].split("\n\n")[1].splitlines()
    assert "peak resident memory of the process" in text and memory[0] == "| L | M | original | pruned |"
    assert memory[4].startswith("| 2 | 4 | OOM | ") and memory[4].split(" | ")[-1] != "OOM |"
    assert "| original | 3 | 3 |" in text and "| pruned | 5 | 4 |" in text
    assert "- L 2: original runs out of memory from batch 4; pruned runs up to batch 5" in text
    with one_thread():
        for row in results["models"]:  # each model's greedy continuation, as a direct generate gives it
            model = AutoModelForCausalLM.from_pretrained(row["path"]).eval()
            tokenizer = AutoTokenizer.from_pretrained(row["path"])
            for prompt, sample in zip(PROMPTS, row["samples"], strict=True):
                ids = tokenizer(prompt, return_tensors="pt")
                direct = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                expected = tokenizer.decode(direct[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
                assert sample == {"prompt": prompt, "text": expected}
                assert _markdown_cell(expected) in text
    assert text.count(f"| {PROMPTS[1]} | ") == 1


def test_the_plots_show_one_marker_per_batch_and_dotted_lines_where_only_the_pruned_model_fits(study):
    output, results = study
    rows = results["models"]
    figure = latency_throughput_figure(rows)
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == ["L = 2", "L = 4"]
    for ax in axes:
        markers = {line.get_label(): line for line in ax.get_lines() if line.get_marker() == "o"}
        assert len(markers["original"].get_xdata()) == 2 and len(markers["pruned"].get_xdata()) == 3
        assert mcolors.to_hex(markers["original"].get_color()) == mcolors.to_hex(REFERENCE_COLOR)
        dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert len(dotted) == 1 and dotted[0].get_color() == markers["pruned"].get_color()
        pruned_cells = {c["batch_size"]: c for c in rows[1]["latency"] if c["new_tokens"] == int(ax.get_title()[4:])}
        assert list(dotted[0].get_xdata()) == [pruned_cells[2]["latency_s"], pruned_cells[4]["latency_s"]]
        assert sorted(t.get_text() for t in ax.texts) == ["M=1", "M=1", "M=2", "M=2", "M=4"]
    by_batch = latency_by_batch_figure(rows)
    assert by_batch.axes[0].get_xscale() == "log" and by_batch.axes[0].get_xlabel() == "batch size M"
    for name in ("latency_throughput.png", "latency_by_batch.png"):
        pixels = mimage.imread(output / name)[..., :3]
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600  # two panels
        for color in (REFERENCE_COLOR, markers["pruned"].get_color()):  # both models are drawn
            drawn = np.abs(pixels - np.array(mcolors.to_rgb(color))).max(axis=-1) < 0.05
            assert drawn.sum() > 50, (name, color)


def test_a_cell_over_a_cpu_memory_limit_is_recorded_as_out_of_memory(tiny_model_dirs, tokenizer, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    roomy = MemoryMeter(torch.device("cpu"), limit_gb=16)
    fits = measure_generation(model, tokenizer, 2, new_tokens=4, warmup=0, runs=1, meter=roomy)
    assert fits["status"] == "ok" and fits["peak_memory_gb"] > 0
    roomy.reset()
    in_use = roomy.current()
    tight = MemoryMeter(torch.device("cpu"), limit_gb=(in_use + 48 * 2**20) / GIB)
    over = measure_generation(model, tokenizer, 512, new_tokens=1, warmup=0, runs=1, meter=tight)
    assert over["status"] == "oom" and "over the limit" in over["oom"]  # 512 x 49152 fp32 logits: 96 MiB
    monkeypatch.setattr(LlamaForCausalLM, "generate", lambda *a, **k: pytest.fail("estimated out of memory: not run"))
    estimated = measure_generation(model, tokenizer, 200_000, new_tokens=4, warmup=0, runs=1,
                                   meter=MemoryMeter(torch.device("cpu"), limit_gb=(in_use + 2**30) / GIB))
    assert estimated["status"] == "oom" and "KV cache" in estimated["oom"]  # 8 x 2 x 200k x 15 x 32 x 4 B = 5.7 GiB


def test_the_cpu_peak_belongs_to_the_cell_not_to_the_process():
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    big = torch.ones(300 * 2**20 // 4)
    del big
    first = meter.peak()
    meter.reset()
    small = torch.ones(10 * 2**20 // 4)
    second = meter.peak()
    del small
    assert first - second > 200 * 2**20, (first, second)  # ru_maxrss would still report the 300 MB


def test_largest_batch_doubles_then_bisects_and_stops_at_the_cap():
    assert largest_batch(lambda m: m <= 37) == {"max_batch": 37, "first_oom": 38, "capped": False, "probes": [
        [1, "ok"], [2, "ok"], [4, "ok"], [8, "ok"], [16, "ok"], [32, "ok"], [64, "oom"], [48, "oom"], [40, "oom"],
        [36, "ok"], [38, "oom"], [37, "ok"]]}
    assert largest_batch(lambda m: False)["max_batch"] == 0
    assert largest_batch(lambda m: True, known_fit=16, cap=100) == {
        "max_batch": 100, "first_oom": None, "capped": True, "probes": [[32, "ok"], [64, "ok"], [100, "ok"]]}


def test_the_prompt_is_the_official_one_cut_or_repeated_to_the_input_length(tokenizer):
    official = tokenizer("The Leaning Tower of Pisa is known for")["input_ids"]
    assert prompt_ids(tokenizer, None).tolist() == official
    assert prompt_ids(tokenizer, 12).tolist() == (official * 2)[:12]
    assert SamplingSection().generate_kwargs() == {"do_sample": False}


def test_bad_efficiency_settings_fail_before_anything_is_loaded(tmp_path, tiny_model_dirs):
    common = [f"model={tiny_model_dirs['llama']}", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match="max_batch=true on a CPU needs latency.memory_limit_gb"):
        load_config(EvalConfig, None, [*common, "device=cpu", "latency.max_batch=true"])
    config = load_config(EvalConfig, None, [*common, "latency.max_batch=true", "zeroshot.tasks=[]"])  # device=auto
    with pytest.raises(ConfigError, match="kernel killing the process"):
        evaluate_models(config)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="more than this machine's"):
        load_config(EvalConfig, None, [*common, "device=cpu", "latency.memory_limit_gb=100000"])
    with pytest.raises(ConfigError, match="latency.new_tokens: expected a list"):
        load_config(EvalConfig, None, [*common, "latency.new_tokens=128"])
