"""Experiment trackers against the real thing (an `mlflow server` on a free port, W&B's
offline run files) and torch.profiler traces: what they hold equals metrics.jsonl."""

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from test_e2e import BIN, clean_env

pytest.importorskip("mlflow")
pytest.importorskip("wandb")

TINY = ["data.name=digits", "model.name=mlp",
        "model.args={in_features: 64, hidden: [32], num_classes: 10}", "optimizer.lr=0.05",
        "data.batch_size=16", "logging.plot=false", "train.log_every_steps=20"]


@pytest.fixture(scope="module", autouse=True)
def mlflow_boot(tmp_path_factory):
    """A real tracking server (sqlite store, local artifact root), started when the module
    starts so that it boots while the tests without MLflow (placed first) run."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        env=clean_env(), start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", root / "server.log"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers (SIGTERM: a slow
        proc.wait(timeout=30)                # graceful shutdown; the store is thrown away)


@pytest.fixture
def mlflow_server(mlflow_boot):
    """The server's URI, once it answers."""
    proc, uri, log = mlflow_boot
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            return uri
        except OSError:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer in 90 s"
            time.sleep(0.2)


def launch(out_dir, *overrides, nproc=2, extra_env=None):
    """`torchrun --nproc-per-node 2 -m distrain train` (nproc=1: one plain process)."""
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "distrain"] if nproc > 1 else [sys.executable, "-m", "distrain"]
    env = {**clean_env(), **(extra_env or {})}
    return subprocess.run([*cmd, "train", f"run.out_dir={out_dir}", *TINY, *overrides],
                          capture_output=True, text=True, timeout=300, env=env)


def rows(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def expected_curves(out_dir) -> dict[str, list[tuple[int, float]]]:
    """Every metric of metrics.jsonl as (step, value) pairs, named as the trackers name them."""
    from distrain.components.observe.experiment import scalars

    curves: dict[str, list] = {}
    for row in rows(out_dir):
        for key, value in scalars(row).items():
            curves.setdefault(key, []).append((row["step"], value))
    return curves


def mlflow_curves(client, run_id, keys) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in keys}


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: W&B's 7-byte header, then LevelDB's log format (32 KiB
    blocks of [crc32c, length, type] + fragment), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path):
    from distrain.components.observe.experiment import flat_config
    from distrain.config import config_from_dict

    out = launch(tmp_path, "train.epochs=2", "logging.wandb=offline", "logging.wandb_project=t",
                 nproc=1, extra_env={"WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    files = glob.glob(f"{runs[0]}/run-*.wandb")
    assert len(files) == 1
    records = wandb_records(Path(files[0]))
    history: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history[items["_step"]] = items
    for key, curve in expected_curves(tmp_path).items():
        assert [(step, history[step][key]) for step, _ in curve] == curve, key
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "t"
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    resolved = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert config == flat_config(resolved)
    assert (Path(runs[0]) / "files" / "metrics.jsonl").read_text() == \
        (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.parametrize("module,override", [("mlflow", "logging.mlflow_uri=http://127.0.0.1:9"),
                                             ("wandb", "logging.wandb=offline")])
def test_a_tracker_without_its_package_is_a_config_error(tmp_path, module, override):
    """The package hidden the way Python itself blocks an import (sys.modules[name] = None)."""
    code = (f"import sys; sys.modules[{module!r}] = None; from distrain.commands.cli import main; "
            f"sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "train", f"run.out_dir={tmp_path}",
                          *TINY, override], capture_output=True, text=True, timeout=120,
                         env=clean_env())
    assert out.returncode == 2
    key = override.split("=")[0]
    assert out.stderr.splitlines() == [
        f"distrain: config error: {key}: expected {'false' if module == 'wandb' else 'empty'} "
        f"without the {module} package, got {override.split('=', 1)[1]!r}; pip install "
        f"{module} (or 'distrain[tracking]')"]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_profile_writes_a_trace_per_rank_with_the_active_steps(tmp_path):
    out = launch(tmp_path, "train.epochs=1",
                 "logging.profile={wait: 1, warmup: 1, active: 3, ranks: [0, 1]}")
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        traces = glob.glob(str(tmp_path / "profile" / f"rank{rank}.*.pt.trace.json"))
        assert len(traces) == 1, traces
        events = json.loads(Path(traces[0]).read_text())["traceEvents"]
        names = {e.get("name") for e in events}
        assert names & {"aten::addmm", "aten::mm"}, sorted(n for n in names if n)[:20]
        assert len({n for n in names if n and n.startswith("ProfilerStep#")}) == 3
        assert f"distrain: profile of rank {rank}" in out.stdout
    assert "Self CPU time total" in out.stdout


@pytest.mark.parametrize("override,message", [
    ("logging.profile.wait=-1", "logging.profile.wait: expected an integer >= 0, got -1"),
    ("logging.profile.steps=3", "logging.profile.steps: unknown key"),
    ("logging.profile.ranks=[-1]", "logging.profile.ranks: expected a list of ranks"),
])
def test_profile_config_mistakes_name_the_key(override, message):
    from distrain.config import load_config
    from distrain.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_mlflow_holds_metrics_config_files_and_continues_on_resume(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    from distrain.components.observe.experiment import flat_config
    from distrain.config import config_from_dict

    track = [f"logging.mlflow_uri={mlflow_server}", "logging.mlflow_experiment=tests",
             "logging.log_best_checkpoint=true"]
    first = launch(tmp_path, "train.epochs=2", *track)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    expected = expected_curves(tmp_path)
    assert len(expected["val_loss"]) == 2 and "val_recall/9" in expected
    assert mlflow_curves(client, run_id, expected) == expected  # exact floats, same steps
    resolved = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert run.data.params == flat_config(resolved)
    assert run.data.params["train.epochs"] == "2" and len(run.data.params) > 80
    assert run.data.tags["distrain.world_size"] == "2"
    assert run.data.tags["distrain.backend"] == "torchrun"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.jsonl", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pt"]
    steps = [m.step for m in client.get_metric_history(run_id, "step/loss")]
    assert steps == [20, 40, 45, 65, 85, 90]  # every 20 steps and each epoch's last (45 a epoch)
    assert not (tmp_path / "profile").exists()  # logging.profile off: no profiler

    # One more epoch: the same MLflow run, one point per step (none logged twice).
    second = launch(tmp_path, "train.epochs=3", "checkpoint.resume=auto", *track)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "trackers.json").read_text())["mlflow"]["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    expected = expected_curves(tmp_path)
    assert [step for step, _ in expected["val_loss"]] == [45, 90, 135]
    assert mlflow_curves(client, run_id, expected) == expected
    assert [m.step for m in client.get_metric_history(run_id, "step/loss")] == \
        [20, 40, 45, 65, 85, 90, 110, 130, 135]
    assert run.data.params["train.epochs"] == "2" and run.data.tags["resumed.train.epochs"] == "3"


def test_mlflow_run_ends_killed_when_preempted(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    out = launch(tmp_path, "train.epochs=1", f"logging.mlflow_uri={mlflow_server}",
                 "data.name=faulty:preempting_digits", "data.num_workers=0",
                 f"data.args={{after: 200, marker: '{tmp_path / 'm'}', signum: 10, to_self: true}}",
                 nproc=1, extra_env={"PYTHONPATH": os.pathsep.join(
                     [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 75, out.stderr[-3000:]
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]["run_id"]
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "KILLED"


def test_mlflow_run_ends_failed_after_an_error(tmp_path, mlflow_server, no_dist_env):
    """In this process (no interpreter to start): the weights overflow, steps are skipped
    until train.max_bad_steps stops the run with an error."""
    from conftest import tiny_config
    from mlflow.tracking import MlflowClient

    from distrain.errors import NonFiniteError
    from distrain.trainer.run import train

    with pytest.raises(NonFiniteError):
        train(tiny_config(tmp_path, "train.epochs=1", f"logging.mlflow_uri={mlflow_server}",
                          "optimizer.lr=1e30", "train.max_bad_steps=2"))
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]["run_id"]
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FAILED" and "config.yaml" in \
        {a.path for a in MlflowClient(mlflow_server).list_artifacts(run_id)}


def serve_mlflow(root: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT,
        env=clean_env(), start_new_session=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.1)


def answers(uri: str) -> bool:
    try:
        urllib.request.urlopen(f"{uri}/health", timeout=1)
        return True
    except OSError:
        return False


def epochs_done(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_tracking_server_gone_mid_run_stalls_nothing_and_gets_every_point_back(tmp_path):
    """The server is killed when epoch 2 ends and started again (same store) when epoch 4
    ends: training goes on without waiting for it, and at the end MLflow holds every
    point of metrics.jsonl (the ones sent while it was away included)."""
    from mlflow.tracking import MlflowClient

    store, out = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = serve_mlflow(store, port)
    run = None
    try:
        wait_for(lambda: answers(uri), 90, "the mlflow server's start")
        env = {**clean_env(), "PYTHONPATH": f"{Path(__file__).parent}:{os.environ.get('PYTHONPATH', '')}"}
        run = subprocess.Popen(
            [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
             "-m", "distrain", "train", f"run.out_dir={out}", *TINY, "train.epochs=7",
             "data.name=faulty:slow_digits", "data.args={delay_s: 0.002}",
             f"logging.mlflow_uri={uri}", "logging.mlflow_experiment=outage",
             "logging.tracker_timeout_s=90"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        wait_for(lambda: epochs_done(out) >= 2 or run.poll() is not None, 240, "epoch 2")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        wait_for(lambda: epochs_done(out) >= 4 or run.poll() is not None, 240, "epoch 4")
        assert run.poll() is None, "the run ended before the server came back"
        server = serve_mlflow(store, port)  # the same store, the same port
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        history = rows(out)
        assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6, 7]
        times = [r["epoch_time_s"] for r in history]
        print("epoch times with the server away after epoch 2, back after epoch 4:", times)
        # MLflow's own client retries 7 times with backoff for minutes; nothing here waited.
        assert max(times[2:4]) < 5 * min(times[:2]), times
        assert "not sent" not in stderr, stderr[-2000:]
        wait_for(lambda: answers(uri), 90, "the mlflow server's start")
        client = MlflowClient(uri)
        run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
        assert client.get_run(run_id).info.status == "FINISHED"
        expected = expected_curves(out)
        assert len(expected["val_loss"]) == 7
        assert mlflow_curves(client, run_id, expected) == expected  # every point, exactly
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def test_an_unreachable_tracker_is_one_line_and_the_run_trains_on_or_stops(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    on = launch(tmp_path / "on", "train.epochs=1", f"logging.mlflow_uri={dead}", nproc=1)
    assert on.returncode == 0, on.stderr[-2000:]
    said = [line for line in on.stderr.splitlines() if "MLflow" in line]
    assert said == [f"distrain: warning: MLflow at {dead} cannot be reached ([Errno 111] "
                    "Connection refused); training on without it (metrics.jsonl holds every "
                    "row; logging.tracker_unreachable=stop stops instead)"]
    assert len(rows(tmp_path / "on")) == 1 and "Traceback" not in on.stderr
    off = launch(tmp_path / "off", "train.epochs=1", f"logging.mlflow_uri={dead}",
                 "logging.tracker_unreachable=stop", nproc=1)
    assert off.returncode == 2 and "Traceback" not in off.stderr
    assert off.stderr.strip().splitlines()[-1] == (
        f"distrain: config error: logging.tracker_unreachable: MLflow at {dead} cannot be "
        "reached ([Errno 111] Connection refused); start the server, or pass "
        "logging.tracker_unreachable=warn to train without it")
    assert not (tmp_path / "off" / "metrics.jsonl").exists()  # nothing trained


def test_an_unreachable_tracker_stops_every_elastic_worker(tmp_path):
    """Under an elastic horovodrun (no collective at set-up, so rank 0 stops alone) no
    worker trains on without the tracker: horovodrun ends the job when rank 0 exits 2, even
    with --min-np 1 (measured: rank 0's exit is not taken for a lost host)."""
    from distrain.distributed.horovod import horovod_available

    if not horovod_available():
        pytest.skip("Horovod is built by ./launcher/setup")
    dead = f"http://127.0.0.1:{free_port()}"
    hosts = tmp_path / "hosts.sh"
    hosts.write_text("#!/bin/sh\necho localhost:2\n")
    hosts.chmod(0o755)
    cmd = [str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(hosts), "--gloo", "--network-interface", "lo",
           str(BIN / "distrain"), "train", f"run.out_dir={tmp_path / 'run'}", *TINY,
           "train.epochs=1", f"logging.mlflow_uri={dead}", "logging.tracker_unreachable=stop"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=clean_env())
    assert done.returncode != 0, done.stdout[-2000:]
    text = done.stdout + done.stderr
    assert "config error: logging.tracker_unreachable: MLflow at" in text, text[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no worker trained on


def test_a_folder_as_the_mlflow_uri_is_a_database_inside_it(tmp_path):
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "mlruns"
    run = launch(tmp_path / "run", "train.epochs=2", f"logging.mlflow_uri={folder}", nproc=1)
    assert run.returncode == 0, run.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    expected = expected_curves(tmp_path / "run")
    assert mlflow_curves(client, run_id, expected) == expected
    assert (folder / "artifacts").is_dir()
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "metrics.jsonl"}


def test_a_folder_that_is_an_mlflow_file_store_stays_one(tmp_path, monkeypatch):
    """An mlruns/ folder MLflow 2 wrote (its file store): the new run joins the old ones
    there, rather than a database beside them that hides them."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as MLflow 2 wrote it, here
    folder = tmp_path / "mlruns"
    old = MlflowClient(folder.as_uri())
    old_run = old.create_run(old.create_experiment("distrain")).info.run_id
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # the user's shell does not set it
    run = launch(tmp_path / "run", "train.epochs=1", f"logging.mlflow_uri={folder}", nproc=1)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not (folder / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["run_id"]
    runs = {r.info.run_id for r in old.search_runs([old.get_experiment_by_name("distrain")
                                                    .experiment_id])}
    assert runs == {old_run, run_id} and old.get_run(run_id).info.status == "FINISHED"
