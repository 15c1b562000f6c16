"""The layout of a training run's directory, spelled once for CPT, LoRA, export and evaluation.

  <output_dir>/
    config.yaml      the resolved config
    metrics.jsonl    one record per step (and per evaluation)
    tensorboard/     the same scalars; wandb/, mlflow.db, mlflow-artifacts/ with those trackers
    trackers.json    the tracked runs (W&B, MLflow) each launch fed and the last step each received
    curves.png       loss, held-out loss, lr, tokens/s, zero-shot accuracy, drawn when a launch ends
    profile/         torch.profiler traces of `profile.steps`, CUDA memory snapshots of out-of-memory steps
    checkpoints/     committed checkpoints (training/checkpoint.py)
    hf_template/     model config + tokenizer (+ the LoRA adapter config and base model): what an
                     export of any checkpoint needs besides the checkpoint's weights
    exports/step_N/  Hugging Face checkpoints exported from the live engine (CPT)
    watchdog/step_N/ every rank's Python stacks from a step that ran far longer than usual
    adapter/, merged/, data_report.json   LoRA's outputs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def tag_for(step: int) -> str:
    """The name of a step's checkpoint and export: step_00000100."""
    return f"step_{step:08d}"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir:
        """The run that holds `<run>/checkpoints/step_N`."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def trackers(self) -> Path:
        return self.root / "trackers.json"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def template(self) -> Path:
        return self.root / "hf_template"

    @property
    def watchdog(self) -> Path:
        return self.root / "watchdog"

    def export(self, step: int) -> Path:
        return self.root / "exports" / tag_for(step)

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def data_report(self) -> Path:
        return self.root / "data_report.json"
