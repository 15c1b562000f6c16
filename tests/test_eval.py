"""Evaluation: perplexity, lm-eval zero-shot (on the real SmolLM2 and a local task cut from real text),
latency, the stage and its table, and the errors offline users meet."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from data.config import ConfigError, load_config
from data.embedded import CLOZE_TASK, tasks_path
from data.text import TextSourceError
from pruning.layers import remove_blocks
from tests.fixtures import ROOT, SMOLLM2_PPL_20_REMOVED
from training.evaluation.config import EvalConfig
from training.evaluation.latency import measure_generation
from training.evaluation.perplexity import perplexity, segment_stream
from training.evaluation.run import evaluate_models, load_texts
from training.evaluation.tables import markdown_table
from training.evaluation.zeroshot import ShardedLM, TaskUnavailableError, load_tasks, run_tasks

LIMIT = 40


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="module")
def cloze_tasks():
    return load_tasks([CLOZE_TASK], tasks_path())


@pytest.fixture(scope="module")
def hflm_scores(smollm2, tokenizer, cloze_tasks):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=smollm2, tokenizer=tokenizer, batch_size=8, device="cpu")
    return run_tasks(lm, cloze_tasks, [CLOZE_TASK], limit=LIMIT, log_samples=True)


def test_perplexity_equals_a_direct_computation_from_logits(tiny_model_dirs, tokenizer, wiki_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    segments = segment_stream([wiki_path.read_text()[:20000]], tokenizer, 64, max_segments=6)
    with torch.no_grad():
        logits = model(input_ids=segments).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), segments[:, 1:].reshape(-1))
    assert perplexity(model, segments, batch_size=4) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert segments[0, 0] == tokenizer.bos_token_id and segments[1, 0] != tokenizer.bos_token_id
    every = segment_stream([wiki_path.read_text()[:20000]], tokenizer, 64, bos="every", max_segments=6)
    assert (every[:, 0] == tokenizer.bos_token_id).all()


def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    target = whole[len(context_ids):]
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].float(), dim=-1)
    return float(sum(logprobs[len(context_ids) - 1 + i, t] for i, t in enumerate(target)))


def test_lm_eval_loglikelihoods_match_a_hand_computation_on_smollm2(smollm2, tokenizer, hflm_scores):
    samples = hflm_scores["samples"][CLOZE_TASK]
    for sample in samples[:3]:
        doc = sample["doc"]
        by_hand = [hand_loglikelihood(smollm2, tokenizer, doc["context"], " " + c) for c in doc["choices"]]
        from_lm_eval = [float(r[0][0]) for r in sample["resps"]]
        # the same fp32 model; lm-eval pads its batch of 8 (seen: up to 1.5e-5 apart)
        assert from_lm_eval == pytest.approx(by_hand, abs=1e-4)
        assert sample["acc"] == float(max(range(len(by_hand)), key=by_hand.__getitem__) == doc["answer"])


def test_real_smollm2_beats_chance_and_pruning_raises_perplexity(smollm2_dir, tokenizer, hflm_scores, wiki_path):
    accuracy = hflm_scores["tasks"][CLOZE_TASK]["value"]
    assert hflm_scores["tasks"][CLOZE_TASK]["metric"] == "acc"
    assert accuracy > 0.5, f"{accuracy} is not above the 0.25 chance of 4 choices"
    segments = segment_stream([wiki_path.read_text()], tokenizer, 128, max_segments=8)
    original = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    before = perplexity(original, segments)
    remove_blocks(original, SMOLLM2_PPL_20_REMOVED)  # the PPL criterion's choice at 20%, from its prune run
    assert perplexity(original, segments) > before * 1.5


def test_sharded_lm_scores_as_lm_eval_hflm(smollm2, tokenizer, cloze_tasks, hflm_scores):
    lm = ShardedLM(lambda ids: smollm2(input_ids=ids).logits, tokenizer, torch.device("cpu"), batch_size=5)
    ours = run_tasks(lm, cloze_tasks, [CLOZE_TASK], limit=LIMIT, log_samples=True)
    assert ours["tasks"][CLOZE_TASK]["value"] == hflm_scores["tasks"][CLOZE_TASK]["value"]
    for mine, theirs in zip(ours["samples"][CLOZE_TASK], hflm_scores["samples"][CLOZE_TASK], strict=True):
        # batches of 5 against lm-eval's 8, padded otherwise (seen: up to 2.5e-5 apart)
        assert [r[0][0] for r in mine["resps"]] == pytest.approx([r[0][0] for r in theirs["resps"]], abs=1e-4)


def test_unknown_tasks_and_offline_data_name_what_to_set(tmp_path, tiny_model_dirs):
    with pytest.raises(TaskUnavailableError, match=r"unknown lm-eval task 'boolqq' \(did you mean boolq"):
        load_tasks(["boolqq"], None)
    with pytest.raises(TaskUnavailableError, match="task 'boolq' cannot load its data.*include_path"):
        load_tasks(["boolq"], None)
    config = load_config(EvalConfig, None, [f"model={tiny_model_dirs['llama']}", f"output_dir={tmp_path / 'out'}",
                                            "zeroshot.tasks=[]"])
    with pytest.raises(TextSourceError, match=r"perplexity.sets\[0\] \(wikitext2\).*local file"):
        evaluate_models(config)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        load_config(EvalConfig, None, [])


def test_perplexity_text_from_a_local_parquet_in_the_hub_format(tmp_path, tokenizer, wiki_path):
    rows = ["", " = Heading = ", "", *wiki_path.read_text().splitlines()[:3]]
    pq.write_table(pa.table({"text": rows}), tmp_path / "test-00000-of-00001.parquet")
    section = load_config(EvalConfig, None, [
        "model=x", f"perplexity.sets=[{{name: wikitext2, source: {tmp_path / 'test-00000-of-00001.parquet'}}}]"
    ]).perplexity
    texts = load_texts(section)
    assert texts["wikitext2"] == rows  # blank rows kept: they are part of the paper's "\n\n".join stream


def test_latency_follows_the_protocol(tiny_model_dirs, tokenizer, monkeypatch):
    """Warm-up runs untimed, then the mean of the timed runs, each forced to exactly `new_tokens` tokens from
    `input_tokens` prompt tokens: a clock that advances by a set time per generation gives the expected figures."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    generate, calls = model.generate, []
    durations = iter([100.0, 0.5, 1.5, 1.0])  # one warm-up (ignored), three timed runs
    clock = [0.0]

    def timed_generate(inputs, **options):
        output = generate(inputs, **options)
        calls.append((tuple(inputs.shape), tuple(output.shape), options["attention_mask"].sum().item()))
        clock[0] += next(durations)
        return output

    model.generate = timed_generate
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    result = measure_generation(model, tokenizer, batch_size=2, input_tokens=12, new_tokens=16, warmup=1, runs=3)
    assert calls == [((2, 12), (2, 12 + 16), 2 * 12)] * 4  # no early stop at EOS: exactly 16 new tokens each
    assert result["latency_s"] == pytest.approx(1.0) and result["latency_stdev_s"] == pytest.approx((2 / 3) ** 0.5 / 2)
    assert result["times_s"] == pytest.approx([0.5, 1.5, 1.0])
    assert result["tokens_per_s"] == pytest.approx((32 / 0.5 + 32 / 1.5 + 32 / 1.0) / 3)  # th_mean: mean of runs' rates
    assert (result["batch_size"], result["input_tokens"], result["new_tokens"], result["runs"]) == (2, 12, 16, 3)
    assert result["status"] == "ok" and result["memory"] == "peak resident memory of the process"
    assert result["peak_memory_gb"] > 0  # the CPU's figure: the process's peak RSS


def test_eval_stage_writes_results_and_a_side_by_side_table(tmp_path, tiny_model_dirs, wiki_path):
    original, pruned = tiny_model_dirs["llama"], tmp_path / "pruned"
    model = AutoModelForCausalLM.from_pretrained(original)
    remove_blocks(model, [2, 3])
    model.save_pretrained(pruned)
    (pruned / "tokenizer.json").write_bytes((original / "tokenizer.json").read_bytes())
    (pruned / "tokenizer_config.json").write_bytes((original / "tokenizer_config.json").read_bytes())
    common = ["zeroshot.tasks=[wiki_cloze]", "zeroshot.include_path=embedded:tasks", "zeroshot.limit=8",
              f"perplexity.sets=[{{name: wiki, source: {wiki_path}}}]", "perplexity.max_segments=4",
              "latency.warmup=1", "latency.runs=1", "latency.new_tokens=[4]"]
    first = subprocess.run([sys.executable, str(ROOT / "launch" / "eval.py"), f"model={original}",
                            f"output_dir={tmp_path / 'a'}", *common], capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([sys.executable, str(ROOT / "launch" / "eval.py"),
                             f"models=[{{name: pruned, path: {pruned}}}]", f"compare=[{tmp_path / 'a' / 'results.json'}]",
                             f"output_dir={tmp_path / 'b'}", *common], capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-3000:]
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["llama", "pruned"]
    assert [m["blocks"] for m in results["models"]] == [8, 6]
    for row in results["models"]:
        assert set(row["perplexity"]) == {"wiki@128"} and row["zeroshot"]["tasks"]["wiki_cloze"]["metric"] == "acc"
        assert row["latency"][0]["new_tokens"] == 4 and row["fingerprint"]
    assert results["versions"]["lm_eval"] and results["config"]["zeroshot"]["limit"] == 8
    table = (tmp_path / "b" / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | params | blocks | PPL wiki@128 | wiki_cloze (acc) | avg acc |")
    assert table[2].startswith("| llama |") and table[3].startswith("| pruned |")
    assert "| llama |" in second.stdout


def test_table_reports_the_papers_metric_per_task():
    rows = [{"name": "m", "params": 5.5e9, "blocks": 26, "perplexity": {"wikitext2@128": 17.7},
             "zeroshot": {"tasks": {"hellaswag": {"metric": "acc_norm", "value": 0.704},
                                    "boolq": {"metric": "acc", "value": 0.727}}, "average": 0.7155},
             "latency": [{"batch_size": 1, "new_tokens": 128, "latency_s": 1.9, "tokens_per_s": 66.0,
                          "peak_memory_gb": 11.2}]}]
    table = markdown_table(rows)
    assert "hellaswag (acc_norm)" in table and "boolq (acc)" in table and "peak GPU GB" in table
    assert "| m | 5,500.0M | 26 | 17.70 | 70.4 | 72.7 | 71.5 | 1.900 | 66.0 | 11.20 |" in table


@pytest.mark.parametrize("add_bos_token", ["false", "null"])
def test_paper_eval_config_reaches_lm_eval_with_its_bos_setting(add_bos_token, tmp_path, tiny_model_dirs, monkeypatch):
    """configs/eval/paper.yaml scores without BOS, as the official harness did, even with a tokenizer that adds one."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    model_dir = tmp_path / "bos-model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).save_pretrained(model_dir)
    bos_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"], add_bos_token=True)
    bos_tokenizer.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir)("The")["input_ids"][0] == bos_tokenizer.bos_token_id
    contexts = []
    scored = HFLM._loglikelihood_tokens

    def spy(self, requests, *args, **kwargs):
        contexts.extend(context for _, context, _ in requests)
        return scored(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", spy)
    config = load_config(EvalConfig, ROOT / "configs" / "eval" / "paper.yaml", [
        f"model={model_dir}", f"output_dir={tmp_path / 'out'}", "dtype=fp32", "zeroshot.tasks=[wiki_cloze]",
        "zeroshot.include_path=embedded:tasks", "zeroshot.limit=2", "perplexity.sets=[]", "latency.batch_sizes=[]",
        "samples.prompts=[]",
        f"zeroshot.add_bos_token={add_bos_token}"])
    results = json.loads((evaluate_models(config) / "results.json").read_text())
    with_bos = add_bos_token == "null"
    assert contexts and all((c[0] == bos_tokenizer.bos_token_id) == with_bos for c in contexts)
    assert results["models"][0]["zeroshot_bos"] is with_bos
    assert results["zeroshot_add_bos_token"] == (None if with_bos else False)
