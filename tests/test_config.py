import importlib
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from data.batch_layout import accumulation_steps
from data.config import ConfigError, load_config, save_config
from pruning.config import PruneConfig
from tests.fixtures import ROOT


@dataclass
class Inner:
    rate: float = 0.1
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    steps: int = 10
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    maybe: int | None = None
    path: Path = Path("x")
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_dotted_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 5\ninner:\n  rate: 0.5\n  names: [a, b]\n")
    config = load_config(Outer, recipe, ["inner.rate=1e-4", "flag=true", "maybe=3", "mode=b", "path=/tmp/q"])
    assert config.steps == 5 and config.flag is True and config.maybe == 3 and config.mode == "b"
    assert config.inner.rate == pytest.approx(1e-4) and config.inner.names == ["a", "b"]
    assert config.path == Path("/tmp/q")
    assert load_config(Outer, None, ["maybe=null"]).maybe is None


@pytest.mark.parametrize("override, message", [
    ("stepz=3", "unknown config key stepz"),
    ("inner.rat=3", "unknown config key inner.rat"),
    ("steps=abc", "steps: expected an integer"),
    ("flag=maybe", "flag: expected true or false"),
    ("mode=c", "mode: 'c' is not one of"),
    ("nokeyvalue", "is not key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(PruneConfig, None, ["criterion=taylor+", "target.num_blocks=3", "target.param_ratio=null"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(PruneConfig, tmp_path / "c.yaml") == config


def test_prune_config_validation():
    assert load_config(PruneConfig).target.param_ratio == 0.2  # the paper's 20% unless told otherwise
    assert load_config(PruneConfig, None, ["target.num_blocks=3"]).target.param_ratio is None
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(PruneConfig, None, ["target.num_blocks=3", "target.param_ratio=0.3"])
    with pytest.raises(ConfigError, match="criterion: 'magic' is not one of"):
        load_config(PruneConfig, None, ["criterion=magic"])
    with pytest.raises(ConfigError, match="iterative=true works with the ppl criterion only"):
        load_config(PruneConfig, None, ["criterion=taylor", "iterative=true"])
    with pytest.raises(ConfigError, match="param_ratio must be between 0 and 1"):
        load_config(PruneConfig, None, ["target.param_ratio=1.5"])
    assert load_config(PruneConfig, None, ["criterion=taylor+"]).protected_counts == (4, 2)
    assert load_config(PruneConfig, None, ["criterion=ppl"]).protected_counts == (0, 0)


HELP_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("heavy imports:", sorted(m for m in ("torch", "deepspeed", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "launch").glob("*.py") if not p.name.startswith("_")))
def test_every_launch_script_answers_help_without_heavy_imports(script):
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, str(ROOT / "launch" / script)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
    assert "heavy imports: []" in result.stdout
    example = re.search(r"e\.g\. (\S+=\S+)", result.stdout.replace("\n", " "))
    if example and script in STAGE_OF_SCRIPT:  # the example override is a real key of the stage's config
        node = stage_config_class(STAGE_OF_SCRIPT[script])
        for part in example.group(1).split("=")[0].split("."):
            node = typing.get_type_hints(node)[part]  # KeyError: not a key of the config


STAGE_OF_SCRIPT = {"prune.py": "prune", "prepare_data.py": "prepare_data", "cpt.py": "cpt", "lora.py": "lora",
                   "eval.py": "eval", "quantize.py": "quantize"}
RECIPE_STAGES = {"prune": "prune", "data": "prepare_data", "cpt": "cpt", "lora": "lora", "eval": "eval",
                 "quantize": "quantize"}


def stage_config_class(stage: str) -> type:
    from launch.submit import STAGES

    module, name = STAGES[stage].config_class.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_recipe_loads(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name other recipes relative to the project root
    path = ROOT / recipe
    if path.parent == ROOT / "configs":  # configs/demo.yaml: the demo's own config
        from launch.demo import DemoConfig

        config = load_config(DemoConfig, path)
        for field in ("prune_recipe", "data_recipe", "cpt_recipe", "lora_recipe", "eval_recipe"):
            assert getattr(config, field).is_file(), f"{recipe} names a missing {field}"
        return
    if path.parent == ROOT / "configs" / "chain":  # every job's recipe, the products of earlier jobs filled in
        from launch.submit import parse, plan_jobs

        assert plan_jobs(*parse(["chain", "--config", recipe]))
        return
    stage = RECIPE_STAGES[path.relative_to(ROOT / "configs").parts[0]]
    given_at_run_time = ["model=embedded:smollm2-135m"] if stage == "eval" else []  # eval recipes name no model
    load_config(stage_config_class(stage), path, given_at_run_time)


def test_an_override_of_one_exclusive_member_replaces_the_recipe_choice(tmp_path):
    recipe = ROOT / "configs" / "prune" / "smollm2_ppl_20.yaml"
    assert load_config(PruneConfig, recipe).target.param_ratio == 0.2
    config = load_config(PruneConfig, recipe, ["target.num_blocks=9"])
    assert (config.target.num_blocks, config.target.param_ratio, config.target.blocks) == (9, None, None)
    save_config(config, tmp_path / "resolved.yaml")  # the saved config says which won
    saved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())["target"]
    assert saved == {"num_blocks": 9, "param_ratio": None, "blocks": None, "num_modules": None, "modules": None}
    modules = load_config(PruneConfig, recipe, ["unit=module", "target.modules=[3.attn, 7.mlp]"]).target
    assert (modules.modules, modules.param_ratio) == (["3.attn", "7.mlp"], None)
    with pytest.raises(ConfigError, match="exactly one of"):  # two members on the command line is still ambiguous
        load_config(PruneConfig, recipe, ["target.num_blocks=9", "target.blocks=[3]"])
    from training.config import CPTConfig

    cpt = load_config(CPTConfig, ROOT / "configs" / "cpt" / "vicuna7b_ppl_20.yaml", ["train_steps=5"])
    assert (cpt.train_steps, cpt.train_tokens) == (5, None)


def test_the_batch_rule_has_one_home():
    assert accumulation_steps(512, 2, 8) == 32 and accumulation_steps(512, 2, 64) == 4
    with pytest.raises(ConfigError, match=r"global_batch 500 does not divide into micro_batch 2 x 8 processes.*"
                                          r"global_batch=496"):
        accumulation_steps(500, 2, 8)


@pytest.mark.parametrize("stage", sorted(RECIPE_STAGES.values()))
def test_every_stage_config_round_trips_through_its_saved_yaml(stage, tmp_path):
    """What a run saves beside its artifacts (`save_config`) loads back to the same config."""
    given = ["model=embedded:smollm2-135m"] if stage == "eval" else ["train_steps=3"] if stage == "cpt" else []
    config = load_config(stage_config_class(stage), None, given)
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(stage_config_class(stage), tmp_path / "resolved.yaml") == config
