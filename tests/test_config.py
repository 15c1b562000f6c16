import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from data.config import ConfigError, load_config, save_config
from pruning.config import PruneConfig

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "launch").glob("*.py") if not p.name.startswith("_")))
def test_every_launch_script_has_help(script):
    result = subprocess.run([sys.executable, str(ROOT / "launch" / script), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_shipped_recipes_load():
    for recipe in sorted((ROOT / "configs" / "prune").glob("*.yaml")):
        load_config(PruneConfig, recipe)
