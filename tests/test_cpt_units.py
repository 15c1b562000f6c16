"""Continued pretraining, the parts checked without launching DeepSpeed: config, preflight errors,
schedule, weight-decay groups, checkpoint retention and pointers, metrics files, Slurm environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from data.config import ConfigError, load_config
from data.prepare import PrepareConfig, prepare
from data.shards import DataMismatchError
from tests.fixtures import ROOT, tiny_llama_with_tokens
from training.checkpoint import METADATA, CheckpointStore
from training.config import CPTConfig, ScheduleSection
from training.cpt import plan_cpt
from training.distributed import WorldInfo, first_slurm_host, slurm_environment
from training.metrics import truncate_jsonl
from training.optim import parameter_groups
from training.run_dir import tag_for
from training.schedule import LRPlan
from training.throughput import flops_per_token, matmul_parameters
from training.trainer import deepspeed_config


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tokenizer):
    return tiny_llama_with_tokens(tmp_path_factory.mktemp("cpt-units"), tokenizer, hidden_size=32, layers=2)


def config_for(root: Path, *overrides: str) -> CPTConfig:
    return load_config(CPTConfig, None, [f"model={root / 'model'}", f"data.path={root / 'tokens'}",
                                         f"output_dir={root / 'run'}", "data.seq_len=64", "global_batch=8",
                                         "micro_batch=2", "train_steps=5", *overrides])


WORLD2 = WorldInfo(rank=0, local_rank=0, world_size=2)


def test_defaults_are_the_papers_recipe():
    config = load_config(CPTConfig, None, ["train_tokens=37e9"])  # the 20%-pruned model's CPT length
    assert (config.optimizer.lr, config.optimizer.betas, config.optimizer.weight_decay) == (1e-4, [0.9, 0.95], 0.1)
    assert (config.global_batch, config.micro_batch, config.data.seq_len) == (512, 2, 2048)
    assert config.optimizer.grad_clip == 1.0
    assert config.total_steps() == 35_286  # 37e9 / (512 x 2048), rounded up


@pytest.mark.parametrize("overrides, message", [
    (["zero_stage=4"], "zero_stage: 4 is not one of 1, 2, 3"),
    (["train_steps=null"], "set exactly one of train_steps or train_tokens"),
    (["train_tokens=100"], "set exactly one of train_steps or train_tokens"),
    (["global_batch=9"], "global_batch 9 does not divide into micro_batch 2.*e.g. global_batch=8"),
    (["optimizer.betas=[0.9]"], "optimizer.betas must be two numbers"),
])
def test_bad_config_values_name_the_key(small_run, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_for(small_run, *overrides)


def test_batch_that_does_not_divide_over_the_world_is_refused(small_run):
    config = config_for(small_run, "global_batch=6")
    with pytest.raises(ConfigError, match=r"global_batch 6 does not divide into micro_batch 2 x 2 processes.*"
                                          r"global_batch=8"):
        plan_cpt(config, WORLD2)
    assert plan_cpt(config_for(small_run), WORLD2).accumulation == 2


def test_missing_data_and_model_are_refused(small_run, tmp_path):
    with pytest.raises(DataMismatchError, match="manifest.json does not exist: run launch/prepare_data.py"):
        plan_cpt(config_for(small_run, f"data.path={tmp_path / 'nothing'}"), WORLD2)
    with pytest.raises(ConfigError, match="not a Hugging Face checkpoint directory"):
        plan_cpt(config_for(small_run, f"model={tmp_path}"), WORLD2)


def test_an_output_dir_that_is_a_file_is_refused(small_run, tmp_path):
    (tmp_path / "taken").write_text("a hostfile, say")
    for output_dir in (tmp_path / "taken", tmp_path / "taken" / "run"):
        with pytest.raises(ConfigError, match=f"output_dir {output_dir}: {tmp_path / 'taken'} is a file"):
            plan_cpt(config_for(small_run, f"output_dir={output_dir}"), WORLD2)
    assert (tmp_path / "taken").read_text() == "a hostfile, say"


def test_tokenizer_mismatch_is_refused(small_run, tmp_path):
    other = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(small_run / "model")
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(other)
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((small_run / "model" / name).read_bytes())
    with pytest.raises(DataMismatchError, match="tokenized with another tokenizer"):
        plan_cpt(config_for(small_run, f"model={other}"), WORLD2)


def test_missing_validation_split_is_refused(small_run, tmp_path):
    prepare(load_config(PrepareConfig, None, ["inputs=[embedded:c4_demo.jsonl]", f"output_dir={tmp_path / 'tok'}",
                                              f"tokenizer={small_run / 'model'}"]))
    with pytest.raises(ConfigError, match="no validation split.*validation.every_steps=0"):
        plan_cpt(config_for(small_run, f"data.path={tmp_path / 'tok'}"), WORLD2)
    plan_cpt(config_for(small_run, f"data.path={tmp_path / 'tok'}", "validation.every_steps=0"), WORLD2)


def fake_checkpoint(directory: Path, step: int, world_size: int = 2, **changes) -> Path:
    path = directory / tag_for(step)
    path.mkdir(parents=True)
    metadata = {"step": step, "world_size": world_size, "fingerprints": {"data": "d", "model": "m"},
                "config": {"global_batch": 8, "data": {"seq_len": 64, "mixture": "natural"}}}
    metadata.update(changes)
    (path / METADATA).write_text(json.dumps(metadata))
    return path


def test_resume_refuses_a_checkpoint_of_another_run(small_run, tmp_path):
    config = config_for(small_run, f"output_dir={tmp_path}")
    plan = plan_cpt(config, WORLD2)
    changes = {"config": {"global_batch": 16, "data": {"seq_len": 64, "mixture": "natural"}}, "fingerprints": plan.fingerprints}
    fake_checkpoint(tmp_path / "checkpoints", 4, **changes)
    with pytest.raises(ConfigError, match="trained with global_batch=16, not 8"):
        plan_cpt(config, WORLD2)
    with pytest.raises(ConfigError, match="already holds checkpoints.*resume=true"):
        plan_cpt(config_for(small_run, f"output_dir={tmp_path}", "resume=false"), WORLD2)
    fake_checkpoint(tmp_path / "checkpoints", 6, **{**changes, "config": {"global_batch": 8, "data": {"seq_len": 64},
                                                                          "init": "random"}})
    with pytest.raises(ConfigError, match="trained with init=random, not pretrained"):  # CPT from scratch
        plan_cpt(config, WORLD2)


def test_resume_refuses_another_teacher_alpha_or_temperature(small_run, tmp_path):
    """A distilled run's loss is alpha x CE + (1 - alpha) x T^2 x KL(teacher || student): resuming it with
    another teacher, alpha or temperature, or without the teacher, would not continue the same run."""
    teacher = tmp_path / "teacher"
    AutoModelForCausalLM.from_pretrained(small_run / "model").save_pretrained(teacher)
    AutoTokenizer.from_pretrained(small_run / "model").save_pretrained(teacher)
    distill = [f"distill.teacher={teacher}", "distill.alpha=0.5", "distill.temperature=2"]
    run = tmp_path / "run"
    config = config_for(small_run, f"output_dir={run}", *distill)
    plan = plan_cpt(config, WORLD2)
    fake_checkpoint(run / "checkpoints", 4, fingerprints=plan.fingerprints,
                    config={"global_batch": 8, "data": {"seq_len": 64},
                            "distill": {"teacher": str(teacher), "alpha": 0.5, "temperature": 2.0}})
    assert plan_cpt(config, WORLD2).resume_from.step == 4  # the same settings resume
    with pytest.raises(ConfigError, match="trained with distill.alpha=0.5, not 0.3"):
        plan_cpt(config_for(small_run, f"output_dir={run}", *distill, "distill.alpha=0.3"), WORLD2)
    with pytest.raises(ConfigError, match="trained with distill.temperature=2.0, not 1.0"):
        plan_cpt(config_for(small_run, f"output_dir={run}", *distill, "distill.temperature=1"), WORLD2)
    other = tmp_path / "other-teacher"
    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.config.rms_norm_eps = 1e-5  # another model: its config differs
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(other)
    for teacher_setting in (f"distill.teacher={other}", "distill.teacher=null"):
        with pytest.raises(DataMismatchError, match="was trained from another teacher than this config names"):
            plan_cpt(config_for(small_run, f"output_dir={run}", *distill, teacher_setting), WORLD2)


def test_resume_on_another_world_size_asks_for_the_universal_format(small_run, tmp_path):
    config = config_for(small_run, f"output_dir={tmp_path}")
    fingerprints = plan_cpt(config, WORLD2).fingerprints
    fake_checkpoint(tmp_path / "checkpoints", 4, world_size=4, fingerprints=fingerprints,
                    config={"global_batch": 8, "data": {"seq_len": 64, "mixture": "natural"}})
    (tmp_path / "checkpoints" / f"{tag_for(4)}.universal").mkdir()  # converted already: reused
    plan = plan_cpt(config, WORLD2)
    assert plan.resume_from.step == 4 and plan.needs_universal
    assert deepspeed_config(config, plan)["checkpoint"]["load_universal"] is True


@pytest.mark.parametrize("case", ["missing data", "a mixture over a set the data lacks"])
def test_cli_reports_a_bad_run_before_starting_anything(small_run, tmp_path, case):
    data, expected = {"missing data": ([f"data.path={tmp_path / 'missing'}"], "launch/prepare_data.py"),
                      "a mixture over a set the data lacks": (
                          [f"data.path={small_run / 'tokens'}", "data.mixture={RedPajamaC4: 0.5, RedPajamaBook: 0.5}"],
                          "names source set(s) RedPajamaBook")}[case]
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "cpt.py"), f"model={small_run / 'model'}",
                             *data, f"output_dir={tmp_path / 'run'}", "train_steps=3"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_schedule_warms_up_then_decays_to_the_floor():
    multiplier = LRPlan.initial(ScheduleSection(warmup_steps=10, decay="cosine", min_lr_ratio=0.1), 110).multiplier
    assert multiplier(0) == pytest.approx(0.1) and multiplier(9) == pytest.approx(1.0)
    assert multiplier(10) == pytest.approx(1.0) and multiplier(109) == pytest.approx(0.1)
    assert multiplier(60) == pytest.approx(0.55, abs=0.01)  # halfway down the cosine
    linear = LRPlan.initial(ScheduleSection(warmup_fraction=0.0, decay="linear", min_lr_ratio=0.0), 11).multiplier
    assert [round(linear(s), 2) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert LRPlan.initial(ScheduleSection(decay="constant", warmup_fraction=0.5), 10).multiplier(7) == 1.0


def test_weight_decay_spares_norms_and_biases():
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=2, num_attention_heads=2,
                                                         attention_bias=True))
    decay, exempt = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("norm.weight", ".bias")) for p in exempt["params"])
    assert any("embed_tokens" in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(exempt["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)


def test_retention_keeps_the_last_k_and_the_permanent_ones(tmp_path):
    store = CheckpointStore(tmp_path, rank=0, keep_last=2, permanent_every=4)
    for step in (2, 4, 6, 8, 10, 12):
        fake_checkpoint(tmp_path, step)
    (tmp_path / ".tmp-step_00000014").mkdir()
    assert [c.step for c in store.committed()] == [2, 4, 6, 8, 10, 12]
    assert store.apply_retention() == [2, 6]
    assert [c.step for c in store.committed()] == [4, 8, 10, 12]
    assert store.clean_partial() == [".tmp-step_00000014"]


def test_retention_never_deletes_the_best_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, rank=0, keep_last=1, permanent_every=0, keep_best="val.loss")
    for step, loss in ((2, 3.0), (4, 1.5), (6, None), (8, 2.0)):
        fake_checkpoint(tmp_path, step, evaluation={} if loss is None else {"val.loss": loss})
    assert store.best("val.loss").step == 4
    assert store.apply_retention() == [2, 6]
    assert [c.step for c in store.committed()] == [4, 8]


def test_latest_pointer_and_its_fallback(tmp_path):
    store = CheckpointStore(tmp_path, rank=0, keep_last=5, permanent_every=0)
    assert store.latest() is None
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    assert store.latest().step == 4  # no pointer: the newest committed
    (tmp_path / "latest").write_text(tag_for(2))
    assert store.latest().step == 2
    (tmp_path / "latest").write_text(tag_for(8))  # names a checkpoint that is gone
    assert store.latest().step == 4
    (tmp_path / tag_for(6)).mkdir()  # no metadata: never committed
    assert [c.step for c in store.committed()] == [2, 4]


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train.loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "tr')
    truncate_jsonl(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_slurm_environment_maps_to_torch_distributed():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NODELIST": "gpu[07-10]"}
    mapped = slurm_environment(env)
    assert mapped["RANK"] == "5" and mapped["LOCAL_RANK"] == "1" and mapped["WORLD_SIZE"] == "8"
    assert mapped["MASTER_ADDR"] == "gpu07" and mapped["MASTER_PORT"] == str(29500 + 1 + 1234)
    assert slurm_environment({**env, "RANK": "0"}) == {}  # a launcher already set it up
    assert slurm_environment({}) == {}
    assert first_slurm_host("node-a,node-b") == "node-a"


def test_flops_per_token_follows_the_palm_formula():
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    per_block = 4 * 16 * 16 + 3 * 16 * 32
    assert matmul_parameters(model) == 2 * per_block + 100 * 16  # blocks + LM head, no embedding lookup
    assert flops_per_token(model, 128) == 6 * (2 * per_block + 1600) + 12 * 2 * 16 * 128
    from pruning.modules import find_sublayer_modules, remove_units

    remove_units(model, [(0, "attn")], find_sublayer_modules(model))  # module-pruned: one layer without attention
    assert flops_per_token(model, 128) == 6 * (2 * per_block - 4 * 16 * 16 + 1600) + 12 * 1 * 16 * 128


def test_deepspeed_overrides_merge_over_ours(small_run):
    config = config_for(small_run, "deepspeed={zero_optimization: {overlap_comm: false}}", "zero_stage=3")
    ds = deepspeed_config(config, plan_cpt(config, WORLD2))
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                       "overlap_comm": False, "reduce_bucket_size": 200_000_000,
                                       "allgather_bucket_size": 200_000_000}
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (8, 2, 1.0)
    assert ds["bf16"]["enabled"] is (torch.cuda.is_available())


@pytest.mark.parametrize(("override", "message"), [
    ("attn_implementation=flash_attention_4", "cannot be handed document boundaries"),
    ("attn_implementation=flash_attention_2", "flash-attn"),
    ("attn_implementation=flex_attention", "no FlexAttention backward"),
    ("kernels=liger", "liger-kernel|CUDA GPU")])
def test_attention_and_kernels_that_cannot_run_here_are_refused_before_launch(small_run, override, message):
    with pytest.raises(ConfigError, match=message):
        plan_cpt(config_for(small_run, override), WORLD2)


QUIET_PROBE = """
from training import console
console.quiet_other_ranks()
import tqdm, transformers
bar = tqdm.tqdm(range(3))
print("bar disabled:", bar.disable, "transformers level:", transformers.logging.get_verbosity())
"""


@pytest.mark.parametrize("rank, disabled", [("0", False), ("1", True)])
def test_only_rank_zero_shows_progress_bars_and_library_warnings(rank, disabled):
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")}
    result = subprocess.run([sys.executable, "-c", QUIET_PROBE], capture_output=True, text=True, cwd=ROOT,
                            env={**env, "RANK": rank}, timeout=120)
    assert result.returncode == 0, result.stderr
    level = 40 if disabled else 30  # logging.ERROR on other ranks, transformers' default WARNING on rank 0
    assert f"bar disabled: {disabled} transformers level: {level}" in result.stdout
