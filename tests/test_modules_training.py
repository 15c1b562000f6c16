"""The stages after pruning on a module-pruned checkpoint (CPT with a DeepSpeed checkpoint, resume and
export, LoRA, evaluation), and CPT from random initialisation: the real trainer on DeepSpeed as one
process, a tiny Llama with SmolLM2's tokenizer, real C4 token shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

from data.config import ConfigError, load_config
from pruning.checkpoint_code import MODELING_FILE, write_model_code
from pruning.modules import find_sublayer_modules, remove_units
from training.config import CPTConfig, LoRAConfig
from training.run_dir import tag_for

pytestmark = pytest.mark.slow  # DeepSpeed engines

COMMON = ["data.seq_len=64", "global_batch=4", "micro_batch=2", "data.num_workers=0", "validation.sequences=8",
          "checkpoint.every_minutes=0", "checkpoint.keep_last=10", "checkpoint.permanent_every=0",
          "schedule.warmup_steps=0"]


@pytest.fixture(scope="module")
def module_pruned(cpt_inputs, tmp_path_factory) -> Path:
    """The tiny Llama of `cpt_inputs` without layer 0's attention and layer 2's MLP."""
    path = tmp_path_factory.mktemp("module-pruned") / "model"
    model = AutoModelForCausalLM.from_pretrained(cpt_inputs["model"])
    remove_units(model, [(0, "attn"), (2, "mlp")], find_sublayer_modules(model))
    model.save_pretrained(path)
    assert write_model_code(path, model)
    AutoTokenizer.from_pretrained(cpt_inputs["model"]).save_pretrained(path)
    return path


def cpt_config(model: Path, tokens: Path, run_dir: Path, *overrides: str) -> CPTConfig:
    return load_config(CPTConfig, None, [f"model={model}", f"data.path={tokens}", f"output_dir={run_dir}", *COMMON,
                                         *overrides])


def train(config: CPTConfig, world, stop_after: int | None = None):
    from training.cpt import build_cpt_trainer, plan_cpt

    trainer = build_cpt_trainer(config, plan_cpt(config, world),
                                should_stop=lambda: stop_after is not None and trainer.step >= stop_after)
    return trainer, trainer.train()


def records(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_cpt_on_a_module_pruned_checkpoint_resumes_exactly_and_exports_its_code(module_pruned, cpt_inputs, tmp_path,
                                                                               single_process_group):
    from training.cpt import plan_cpt
    from training.export import export_checkpoint

    run = ["train_steps=4", "checkpoint.every_steps=2", "validation.every_steps=2", "trust_remote_code=true"]
    with pytest.raises(ConfigError, match="set trust_remote_code=true"):
        plan_cpt(cpt_config(module_pruned, cpt_inputs["tokens"], tmp_path / "x", *run[:-1]), single_process_group)
    with pytest.raises(ConfigError, match="kernels=liger patches every layer's MLP and norms"):
        plan_cpt(cpt_config(module_pruned, cpt_inputs["tokens"], tmp_path / "x", *run, "kernels=liger"),
                 single_process_group)
    assert not (tmp_path / "x").exists()

    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    trainer, outcome = train(cpt_config(module_pruned, cpt_inputs["tokens"], whole, *run), single_process_group)
    assert outcome == "completed"
    assert type(trainer.engine.module).__name__ == "ShortenedLlamaForCausalLM"
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    exported = whole / "exports" / tag_for(4)
    assert (exported / MODELING_FILE).is_file() and "auto_map" in json.loads((exported / "config.json").read_text())
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, trainer.engine.module(input_ids=ids).logits)

    _, outcome = train(cpt_config(module_pruned, cpt_inputs["tokens"], interrupted, *run), single_process_group,
                       stop_after=2)
    assert outcome == "preempted"
    _, outcome = train(cpt_config(module_pruned, cpt_inputs["tokens"], interrupted, *run), single_process_group)
    assert outcome == "completed"
    assert records(interrupted, "train.loss") == records(whole, "train.loss")  # bitwise, every step
    resumed, uninterrupted = load_file(interrupted / "exports" / tag_for(4) / "model.safetensors"), \
        load_file(exported / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and not any("layers.0.self_attn" in k for k in resumed)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    checkpoint = whole / "checkpoints" / tag_for(4)
    with pytest.raises(ConfigError, match="set trust_remote_code=true"):
        export_checkpoint(checkpoint, tmp_path / "refused", torch.float32)
    offline = export_checkpoint(checkpoint, tmp_path / "offline", torch.float32, trust_remote_code=True)
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(offline, trust_remote_code=True).eval()
        assert torch.equal(again(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_cpt_from_random_init_uses_the_models_own_init_and_trains(module_pruned, cpt_inputs, tmp_path,
                                                                   single_process_group):
    from training.cpt import plan_cpt

    run_dir = tmp_path / "run"
    config = cpt_config(module_pruned, cpt_inputs["tokens"], run_dir, "init=random", "trust_remote_code=true",
                        "seed=7", "train_steps=8", "optimizer.lr=1e-2", "schedule.decay=constant", "checkpoint.every_steps=4",
                        "validation.every_steps=4", "checkpoint.export_at_end=false")
    from training.cpt import build_cpt_trainer

    trainer = build_cpt_trainer(config, plan_cpt(config, single_process_group), should_stop=lambda: False)
    initial = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    set_seed(7)
    own = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(module_pruned), trust_remote_code=True,
                                           dtype=torch.float32).state_dict()
    given = load_file(module_pruned / "model.safetensors")
    assert initial.keys() == own.keys()
    assert all(torch.equal(initial[k], own[k]) for k in own), "the model's own initialisation for seed 7"
    changed = [k for k in given if k in initial and not torch.equal(initial[k], given[k])]
    assert len(changed) > len(given) // 2 and any("proj" in k for k in changed)
    assert trainer.train() == "completed"
    val = records(run_dir, "val.loss")
    assert val[8] < val[0] - 1.0, val
    assert val[0] > 10  # ln(49152) = 10.8: a model that knows nothing

    with pytest.raises(ConfigError, match="trained with init=random, not pretrained"):
        plan_cpt(cpt_config(module_pruned, cpt_inputs["tokens"], run_dir, "trust_remote_code=true",
                            "train_steps=8"), single_process_group)


def test_lora_and_evaluation_of_a_module_pruned_checkpoint(module_pruned, tmp_path, single_process_group, wiki_path):
    from training.evaluation.config import EvalConfig
    from training.evaluation.run import evaluate_models
    from training.lora import build_lora_trainer, plan_lora

    run_dir = tmp_path / "lora"
    overrides = [f"model={module_pruned}", f"output_dir={run_dir}", "data.source=embedded:alpaca_en_demo.json",
                 "data.val_size=8", "data.cutoff_len=64", "train_steps=2", "global_batch=4", "micro_batch=2",
                 "schedule.warmup_steps=0", "validation.every_steps=2", "validation.sequences=8",
                 "checkpoint.every_steps=2", "checkpoint.every_minutes=0", "export=last"]
    with pytest.raises(ConfigError, match="set trust_remote_code=true"):
        plan_lora(load_config(LoRAConfig, None, overrides), single_process_group)
    config = load_config(LoRAConfig, None, [*overrides, "trust_remote_code=true"])
    assert build_lora_trainer(config, plan_lora(config, single_process_group), lambda: False).train() == "completed"
    merged = run_dir / "merged"
    assert (merged / MODELING_FILE).is_file()
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(module_pruned, trust_remote_code=True)
        adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True).eval()(input_ids=ids).logits
    assert torch.allclose(got, adapted, rtol=1e-5, atol=1e-4)

    options = [f"models=[{{name: pruned, path: {module_pruned}}}, {{name: tuned, path: {merged}}}]",
               f"output_dir={tmp_path / 'eval'}", "zeroshot.tasks=[]", "latency.batch_sizes=[]",
               f"perplexity.sets=[{{name: wiki, source: {wiki_path}}}]", "perplexity.max_segments=2"]
    with pytest.raises(ConfigError, match="set trust_remote_code=true"):
        evaluate_models(load_config(EvalConfig, None, options))
    results = evaluate_models(load_config(EvalConfig, None, [*options, "trust_remote_code=true"]))
    rows = json.loads((results / "results.json").read_text())["models"]
    assert [r["blocks"] for r in rows] == [4, 4] and all(r["perplexity"]["wiki@128"] > 1 for r in rows)
