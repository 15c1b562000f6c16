"""LoRA on Alpaca: the real SmolLM2 and the embedded Alpaca sample, through DeepSpeed (world size 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from data.alpaca import PROMPT_NO_INPUT, AlpacaDataError, load_alpaca, prompt_for, tokenize_example
from data.config import ConfigError, load_config
from data.embedded import text_path
from data.nll import IGNORE_INDEX
from tests.fixtures import ROOT, without_distributed_env
from training.config import LoRAConfig
from training.distributed import free_port

pytestmark = pytest.mark.slow  # real DeepSpeed launches or the real SmolLM2

RUN = ["model=embedded:smollm2-135m", "data.source=embedded:alpaca_en_demo.json", "data.val_size=16",
       "data.cutoff_len=96", "train_steps=4", "global_batch=4", "micro_batch=2", "optimizer.lr=1e-3",
       "schedule.warmup_steps=0", "validation.every_steps=4", "validation.sequences=16",
       "checkpoint.every_steps=2", "checkpoint.every_minutes=0"]


@pytest.fixture(scope="module")
def distributed(single_process_group):
    """DeepSpeed as one process, the way `python launch/lora.py` runs on one GPU."""
    return single_process_group


def run_lora(world, output_dir, stop_after: int | None = None) -> str:
    from training.lora import build_lora_trainer, plan_lora

    config = load_config(LoRAConfig, None, [*RUN, f"output_dir={output_dir}"])
    trainer = build_lora_trainer(config, plan_lora(config, world),
                                 should_stop=lambda: stop_after is not None and trainer.step >= stop_after)
    return trainer.train()


@pytest.fixture(scope="module")
def uninterrupted(distributed, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora") / "run"
    assert run_lora(distributed, output) == "completed"
    return output


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_outputs_are_standard(uninterrupted):
    val = {r["step"]: r["val.loss"] for r in records(uninterrupted) if "val.loss" in r}
    assert val[4] < val[0] - 0.02, val  # 4 steps of 4 records: 1.804 -> 1.775 seen (deterministic but for rounding)
    config = json.loads((uninterrupted / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    report = json.loads((uninterrupted / "data_report.json").read_text())
    assert report["used"] == 999 and report["validation"] == 16 and report["train"] == 983
    checkpoint = next((uninterrupted / "checkpoints").glob("step_*"))
    assert sum(f.stat().st_size for f in checkpoint.rglob("*")) < 200e6, "the frozen base stays out"


def test_merged_model_equals_the_adapter_model(uninterrupted, smollm2_dir):
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    adapted = PeftModel.from_pretrained(base, uninterrupted / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(uninterrupted / "merged").eval()
    with torch.no_grad():
        expected, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    # merging adds B @ A into W once: equal up to fp32 rounding of that sum, carried through 30 blocks
    # (seen: 1.4e-4 on logits up to 33, i.e. 4e-6 of their scale)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), float((got - expected).abs().max())
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    saved = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    reloaded = {k: v for k, v in adapted.state_dict().items() if "lora_" in k}
    assert len(saved) == len(reloaded) > 0
    for name, tensor in saved.items():  # the adapter reloads exactly
        match = [v for k, v in reloaded.items() if k.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0], tensor), name


def test_a_lora_checkpoint_exports_and_evaluates_like_a_cpt_one(uninterrupted, tmp_path):
    """launch/export.py merges a checkpoint's adapters into the base named by the run's template: the final
    checkpoint's export equals the merged/ the run wrote; launch/eval.py takes the checkpoint as it is."""
    checkpoint = sorted((uninterrupted / "checkpoints").glob("step_*"))[-1]
    export = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), f"checkpoint={checkpoint}",
                             f"output_dir={tmp_path / 'export'}", "dtype=fp32"], capture_output=True, text=True,
                            env=without_distributed_env(os.environ), cwd=ROOT, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    exported, merged = load_file(tmp_path / "export" / "model.safetensors"), load_file(uninterrupted / "merged" /
                                                                                        "model.safetensors")
    assert exported.keys() == merged.keys()
    for name, tensor in merged.items():
        assert torch.allclose(exported[name], tensor, atol=1e-6), name
    from training.evaluation.run import resolve_checkpoint

    evaluated = load_file(Path(resolve_checkpoint(str(checkpoint), tmp_path / "scratch")) / "model.safetensors")
    assert evaluated.keys() == exported.keys()
    for name, tensor in exported.items():  # the model eval scores is the merged checkpoint
        assert torch.equal(evaluated[name], tensor), name


def test_interrupted_run_resumes_to_the_same_adapter(distributed, uninterrupted, tmp_path):
    output = tmp_path / "run"
    assert run_lora(distributed, output, stop_after=2) == "preempted"
    assert not (output / "adapter").exists()
    assert run_lora(distributed, output) == "completed"
    losses = {r["step"]: r["train.loss"] for r in records(output) if "train.loss" in r}
    assert losses == {r["step"]: r["train.loss"] for r in records(uninterrupted) if "train.loss" in r}
    resumed = load_file(output / "adapter" / "adapter_model.safetensors")
    reference = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    for name in reference:  # dropout masks too: each rank's RNG state travels in the checkpoint
        assert torch.equal(resumed[name], reference[name]), name


def test_prompt_template_and_response_only_labels(tokenizer):
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    assert prompt_for(record) == PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert "### Input:\nsky" in prompt_for({**record, "input": "sky"})
    example = tokenize_example(record, tokenizer, 256, train_on_inputs=False)
    prompt_len = len(tokenizer(prompt_for(record))["input_ids"])
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenize_example(record, tokenizer, 256, train_on_inputs=True)["labels"] == example["input_ids"]
    assert len(tokenize_example(record, tokenizer, 16, train_on_inputs=False)["input_ids"]) == 16


def test_bad_data_files_are_reported(tmp_path):
    with pytest.raises(AlpacaDataError, match="does not exist.*yahma/alpaca-cleaned"):
        load_alpaca(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text('[{"instruction": "a", ')
    with pytest.raises(AlpacaDataError, match="is not valid JSON"):
        load_alpaca(str(tmp_path / "broken.json"))
    (tmp_path / "empty.json").write_text(json.dumps([{"instruction": "a"}, {"output": "b"}]))
    with pytest.raises(AlpacaDataError, match="no usable Alpaca record"):
        load_alpaca(str(tmp_path / "empty.json"))
    records = json.loads(text_path("alpaca_en_demo.json").read_text())[:10]
    records[3].pop("output")
    records[5]["instruction"] = ""
    lines = [json.dumps(r) for r in records] + ['"not a record"']
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines))
    loaded = load_alpaca(str(tmp_path / "mixed.jsonl"))
    assert len(loaded.records) == 8
    assert dict(loaded.skipped) == {"missing_output": 1, "missing_instruction": 1, "not_a_record": 1}


def test_lora_under_the_deepspeed_launcher(cpt_inputs, tmp_path):
    """Two data-parallel processes (a tiny Llama keeps it fast): same global batch, adapter + merged out."""
    env = without_distributed_env(dict(os.environ))
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                             str(free_port()), str(root / "launch" / "lora.py"), f"model={cpt_inputs['model']}",
                             f"output_dir={tmp_path / 'run'}", *RUN[1:], "checkpoint.every_steps=0"],
                            capture_output=True, text=True, env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                            cwd=root, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 ranks x micro-batch 2 x accumulation 1" in result.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").config.num_hidden_layers == 4


def test_validation_hold_out_is_the_official_one():
    """The official split, written as lora_retrain.py does it, holds out the same records as ours."""
    import datasets

    from data.alpaca import split_validation

    path = text_path("alpaca_en_demo.json")
    official = datasets.load_dataset("json", data_files=str(path))["train"].train_test_split(
        test_size=100, shuffle=True, seed=42)
    alpaca = load_alpaca(str(path))
    train, held_out = split_validation(alpaca, 100, 42)
    key = lambda r: (r["instruction"], r["input"] or "", r["output"])  # noqa: E731
    assert sorted(map(key, held_out)) == sorted(map(key, official["test"]))
    assert sorted(map(key, train)) == sorted(map(key, official["train"]))


@pytest.mark.slow
def test_export_takes_the_best_validation_checkpoint(distributed, tmp_path, monkeypatch):
    """Validation losses scripted 3.0, 1.0, 2.0 at steps 0, 1, 2: the exported adapters are step 1's,
    which retention (keep_last=1) kept although it is not the last."""
    from training.lora import build_lora_trainer, plan_lora
    from training.validation import ValidationLoss

    scripted = iter([3.0, 1.0, 2.0])
    monkeypatch.setattr(ValidationLoss, "__call__", lambda self, engine: {"val.loss": next(scripted)})
    output = tmp_path / "run"
    config = load_config(LoRAConfig, None, [*RUN, f"output_dir={output}", "train_steps=2", "schedule.decay=constant",
                                            "validation.every_steps=1", "checkpoint.every_steps=1",
                                            "checkpoint.keep_last=1"])
    trainer = build_lora_trainer(config, plan_lora(config, distributed), should_stop=lambda: False)
    assert trainer.train() == "completed"
    assert sorted(p.name for p in (output / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    info = json.loads((output / "merged" / "export_info.json").read_text())
    assert (info["step"], info["val.loss"], info["last_step"]) == (1, 1.0, 2)
    exported = load_file(output / "adapter" / "adapter_model.safetensors")
    for tag, same in (("step_00000001", True), ("step_00000002", False)):
        module = torch.load(output / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        saved = {k.replace(".default", ""): v for k, v in module.items() if "lora_" in k}
        assert set(saved) == set(exported)
        assert all(torch.equal(saved[k], exported[k]) for k in exported) is same


def test_best_export_without_a_validated_checkpoint_is_refused_before_training(distributed, tmp_path):
    from training.lora import plan_lora

    config = load_config(LoRAConfig, None, [*RUN, f"output_dir={tmp_path / 'run'}", "train_steps=5",
                                            "checkpoint.every_steps=3", "validation.every_steps=2"])
    with pytest.raises(ConfigError, match="no checkpoint of this 5-step run would have a validation loss"):
        plan_lora(config, distributed)
    assert not (tmp_path / "run").exists()
