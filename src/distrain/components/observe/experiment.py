"""Experiment trackers: MLflow (logging.mlflow_uri) and Weights & Biases (logging.wandb).

Rank 0 alone makes them (RunLog does), and each receives what metrics.jsonl receives: one
row of numbers at its optimizer step, the step losses of the progress bar, and at the end
the run's files. A resumed run continues the same tracker run: its id is kept in
<out_dir>/trackers.json. Neither tracker can delete a point, so after a resume a tracker
skips the steps it already holds (the resumed run recomputes them from the checkpoint)
and a reader sees one curve, like metrics.jsonl's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from distrain import __version__
from distrain.components.observe.runfiles import (
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    TRACKERS_FILE,
)
from distrain.config import Config
from distrain.errors import ConfigError

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"  # MLflow's words for a run's end
PARAMS_PER_REQUEST = 100  # MLflow's limit on params in one log_batch


def require_packages(cfg: Config) -> None:
    """A tracker asked for without its package: a ConfigError on every rank, before any
    collective, so all ranks stop alike."""
    wanted = [("mlflow", "logging.mlflow_uri", cfg.logging.mlflow_uri, "mlflow"),
              ("wandb", "logging.wandb", cfg.logging.wandb, "wandb")]
    for module, key, value, pip in wanted:
        if value and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key}: expected {'false' if key == 'logging.wandb' else 'empty'}"
                              f" without the {module} package, got {value!r}; pip install "
                              f"{pip} (or 'distrain[tracking]')")


def flat_config(obj: Any, prefix: str = "") -> dict[str, str]:
    """The resolved config as `section.key` -> the value as YAML writes it inline (strings as
    they are); mappings such as model.args stay one value."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_config(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value if isinstance(value, str) else json.dumps(value)
    return out


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl row's numbers by name (a list such as val_recall as val_recall/<i>),
    the names TensorBoard and the trackers use."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{key}/{i}" if isinstance(value, list) else key] = float(v)
    return out


def _read_ids(out_dir: Path) -> dict:
    path = out_dir / TRACKERS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_ids(out_dir: Path, name: str, value: dict) -> None:
    ids = _read_ids(out_dir)
    ids[name] = value
    path = out_dir / TRACKERS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ids, indent=1) + "\n")
    tmp.replace(path)


def run_files(out_dir: Path) -> list[Path]:
    return [out_dir / f for f in (CONFIG_FILE, METRICS_FILE, PLOT_FILE) if (out_dir / f).exists()]


def best_checkpoint(out_dir: Path) -> Path | None:
    for name in ("best.pt", "best.dcp"):
        if (out_dir / "checkpoints" / name).exists():
            return out_dir / "checkpoints" / name
    return None


class ExperimentTracker:
    """What RunLog calls. `start` opens (or, resumed, reopens) the run; `log_row` gets a
    metrics.jsonl row; `log_step` the progress bar's numbers; `finish` uploads the run's
    files and closes the run with FINISHED, FAILED or KILLED. RunLog calls them through a
    Sender (sender.py): on a background thread, never in the training loop."""

    name = "tracker"  # for the run's lines, with `where` (its URI, its project)
    where = ""

    def start(self, cfg: Config, system: dict, resumed: bool) -> None:
        raise NotImplementedError

    def log_row(self, record: dict) -> None:
        raise NotImplementedError

    def log_step(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, status: str, checkpoint: bool) -> None:
        raise NotImplementedError


def mlflow_store(uri: str) -> tuple[str, str | None]:
    """(tracking URI, artifact folder) for logging.mlflow_uri: a folder (a path, or
    file://) becomes a database inside it, <folder>/mlflow.db, with the artifacts in
    <folder>/artifacts (MLflow 3 keeps its file store behind MLFLOW_ALLOW_FILE_STORE). A
    folder that already is a file store (an mlruns/ of MLflow 2: experiments' meta.yaml, no
    database) stays one, with that switch set, so its earlier runs and the new ones stay in
    one place."""
    if "://" in uri and not uri.startswith("file://"):
        return uri, None
    folder = Path(uri.removeprefix("file://")).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "mlflow.db").exists() and any(folder.glob("*/meta.yaml")):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return folder.as_uri(), None
    return f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")


class MLflowTracker(ExperimentTracker):
    name = "MLflow"

    def __init__(self, out_dir: Path, uri: str, experiment: str) -> None:
        # One try per call and a short timeout (MLflow's defaults: 7 retries, 120 s): the
        # sender retries a failed call itself, keeping the points queued meanwhile.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.out_dir, self.uri, self.experiment = out_dir, uri, experiment
        self.store, self.artifacts = mlflow_store(uri)
        self.where = uri
        self.client: Any = None  # made on the sender's thread: a bad URI fails there
        self.run_id = ""
        self.held_step = -1  # the last step the run holds: resumed rows up to it are skipped

    def start(self, cfg: Config, system: dict, resumed: bool) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self.artifacts is not None:  # a folder: its database's set-up is no news
            for name in ("mlflow.store.db.utils", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(self.store)
        params = flat_config(cfg)
        previous = _read_ids(self.out_dir).get("mlflow", {})
        if resumed and previous.get("uri") == self.uri:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            held = [m.step for key in ("epoch", "step/loss")
                    for m in self.client.get_metric_history(self.run_id, key)]
            self.held_step = max(held, default=-1)
            # Params are immutable in MLflow: keys new to the run are added, changed values
            # (e.g. a longer train.epochs) are kept as tags resumed.<key>.
            old = self.client.get_run(self.run_id).data.params
            for key, value in params.items():
                if key in old and old[key] != value:
                    self.client.set_tag(self.run_id, f"resumed.{key}", value)
            params = {k: v for k, v in params.items() if k not in old}
        else:
            found = self.client.get_experiment_by_name(self.experiment)
            exp_id = found.experiment_id if found else \
                self.client.create_experiment(self.experiment, artifact_location=self.artifacts)
            run = self.client.create_run(exp_id, run_name=self.out_dir.name,
                                         tags={f"distrain.{k}": str(v) for k, v in system.items()})
            self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=items[i:i + PARAMS_PER_REQUEST])
        _write_ids(self.out_dir, "mlflow", {"uri": self.uri, "run_id": self.run_id})

    def _log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.held_step:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in values.items()])

    def log_row(self, record: dict) -> None:
        self._log(int(record["step"]), scalars(record))

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self._log(step, values)

    def finish(self, status: str, checkpoint: bool) -> None:
        for path in run_files(self.out_dir):
            self.client.log_artifact(self.run_id, str(path))
        best = best_checkpoint(self.out_dir) if checkpoint and status == FINISHED else None
        if best is not None and best.is_dir():
            self.client.log_artifacts(self.run_id, str(best), f"checkpoints/{best.name}")
        elif best is not None:
            self.client.log_artifact(self.run_id, str(best), "checkpoints")
        self.client.set_terminated(self.run_id, status)


class WandbTracker(ExperimentTracker):
    name = "W&B"

    def __init__(self, out_dir: Path, mode: str, project: str) -> None:
        self.out_dir, self.mode, self.project = out_dir, mode, project
        self.where = f"project {project} ({mode})"
        self.run: Any = None
        self.held_step = -1

    def start(self, cfg: Config, system: dict, resumed: bool) -> None:
        import wandb

        previous = _read_ids(self.out_dir).get("wandb", {})
        run_id = previous.get("run_id") if resumed else None
        self.held_step = previous.get("step", -1) if run_id else -1
        # The folder must exist: wandb falls back to a temporary one when it does not.
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.project, dir=str(self.out_dir), mode=self.mode,
                              id=run_id, resume="allow",
                              name=self.out_dir.name, config=flat_config(cfg),
                              tags=[f"world_size={system['world_size']}"])
        self.run.summary.update({f"distrain.{k}": v for k, v in system.items()})
        _write_ids(self.out_dir, "wandb", {"run_id": self.run.id, "step": self.held_step})

    def _log(self, step: int, values: dict[str, float]) -> None:
        if step <= self.held_step:
            return
        self.run.log(values, step=step)

    def log_row(self, record: dict) -> None:
        self._log(int(record["step"]), scalars(record))
        # The last step the run holds, for a resume (W&B drops steps below its last one).
        _write_ids(self.out_dir, "wandb", {"run_id": self.run.id, "step": int(record["step"])})

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self._log(step, values)

    def finish(self, status: str, checkpoint: bool) -> None:
        import wandb

        for path in run_files(self.out_dir):  # the run's files folder is uploaded on sync
            shutil.copy2(path, Path(self.run.dir) / path.name)
        best = best_checkpoint(self.out_dir) if checkpoint and status == FINISHED else None
        if best is not None:
            artifact = wandb.Artifact(f"{self.out_dir.name}-best", type="model")
            (artifact.add_dir if best.is_dir() else artifact.add_file)(str(best))
            self.run.log_artifact(artifact)
        if status == KILLED:
            self.run.mark_preempting()
        self.run.finish(exit_code={FINISHED: 0, FAILED: 1, KILLED: 75}[status])


def build_trackers(cfg: Config) -> list[ExperimentTracker]:
    """The trackers the config asks for (call on rank 0 only)."""
    out_dir = Path(cfg.run.out_dir)
    trackers: list[ExperimentTracker] = []
    if cfg.logging.mlflow_uri:
        trackers.append(MLflowTracker(out_dir, cfg.logging.mlflow_uri,
                                      cfg.logging.mlflow_experiment))
    if cfg.logging.wandb:
        trackers.append(WandbTracker(out_dir, cfg.logging.wandb, cfg.logging.wandb_project))
    return trackers


def system_info(backend_name: str, world_size: int) -> dict:
    import torch

    return {"version": __version__, "torch": torch.__version__, "backend": backend_name,
            "world_size": world_size, "host": socket.gethostname(),
            "cuda": torch.version.cuda or "none"}
