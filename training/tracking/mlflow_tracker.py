"""MLflow, through its client API: MLFLOW_TRACKING_URI (a team's server) or a store in the run directory.

The local default is MLflow's own default backend, SQLite, as `<output_dir>/mlflow.db` with artifacts in
`<output_dir>/mlflow-artifacts` (MLflow 3 refuses the old `./mlruns` file store unless
MLFLOW_ALLOW_FILE_STORE=true is set). The run id is saved in every checkpoint, so a resumed job reopens
the same run. Metrics are sent asynchronously (MLflow's own queue) and awaited one step later, so a
slow server costs the training loop nothing until it falls a whole step behind. MLflow would accept a
step twice and keep both values; steps a launch trains again after a resume from an earlier checkpoint
are not sent again (`training/tracking/ledger.py`). Parameters are the flattened resolved config:
MLflow never changes a logged parameter, so a resumed run adds new keys only and the current
config is (re)written as the artifact `config.yaml`.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

from training.config import MlflowSection
from training.tracking.base import TrackedRun

# MLflow's SQL store trips a deprecation warning of SQLAlchemy's on every start: not ours to fix
warnings.filterwarnings("ignore", message="The ``noload`` loader strategy is deprecated")

STATUS = {"completed": "FINISHED", "preempted": "KILLED", "diverged": "FAILED"}
PARAMS_PER_CALL = 100  # MLflow's limit for one log_batch
PARAM_VALUE_CHARS = 6000  # MLflow's limit for a parameter's value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"optimizer": {"lr": 1e-4}} -> {"optimizer.lr": "0.0001"}, as MLflow parameters (strings)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:PARAM_VALUE_CHARS]
    return flat


class MlflowTracker:
    name = "mlflow"

    def __init__(self, tracked: TrackedRun, settings: MlflowSection):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        local = settings.tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{tracked.run.root.resolve() / 'mlflow.db'}" if local else settings.tracking_uri
        self.client = MlflowClient(tracking_uri=uri)  # None: MLflow reads MLFLOW_TRACKING_URI itself
        self.run_id, self.pending = tracked.saved.get("run_id"), None
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
            except MlflowException as err:
                print(f"mlflow: the checkpoint's run {self.run_id} is not in {self.client.tracking_uri} ({err}); "
                      "starting a new MLflow run", flush=True)
                self.run_id = None
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(settings.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                settings.experiment,
                artifact_location=(tracked.run.root.resolve() / "mlflow-artifacts").as_uri() if local else None)
            self.run_id = self.client.create_run(experiment_id, run_name=settings.run_name or tracked.run.root.name,
                                                 tags={"run_dir": tracked.config["run_dir"]}).info.run_id
        self.run_key = f"mlflow:{self.run_id}"
        self.log_config(tracked.config)

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        new = [Param(key, value) for key, value in flatten(config).items() if key not in logged]
        for start in range(0, len(new), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[start:start + PARAMS_PER_CALL])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        previous, self.pending = self.pending, self.client.log_batch(
            self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()],
            synchronous=False)
        if previous is not None:
            previous.wait()  # normally done long ago; raises its error if it failed

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.wait()

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def finish(self, outcome: str) -> None:
        self.wait()
        self.client.set_terminated(self.run_id, STATUS.get(outcome, "FAILED"))
