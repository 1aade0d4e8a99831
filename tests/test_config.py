import os
import subprocess
import sys

import pytest
from conftest import ROOT

from distrain.config import Config, config_from_dict, field_docs, load_config
from distrain.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write(tmp_path, "train: {epochs: 7, grad_accum_steps: 2}\noptimizer: {lr: 0.5}\n")
    cfg = load_config(path, ["train.epochs=3", "optimizer.lr=1e-3", "scheduler.name=none",
                             "data.args={n: 3}"])
    assert cfg.train.epochs == 3  # CLI over YAML
    assert cfg.train.grad_accum_steps == 2  # YAML over default
    assert cfg.optimizer.lr == pytest.approx(1e-3)  # YAML 1.1's '1e-3' string becomes a float
    assert cfg.scheduler.name == "none"
    assert cfg.data.args == {"n": 3}
    assert cfg.data.batch_size == Config().data.batch_size  # default kept


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "train.epoch: unknown key; did you mean 'train.epochs'?"),
    ("trian.epochs=3", "trian: unknown key; did you mean 'train'?"),
    ("train.grad_accum_steps=two", "train.grad_accum_steps: expected an integer, got 'two'"),
    ("train.precision=fp8", "train.precision: expected one of 'fp32', 'fp16', 'bf16', got 'fp8'"),
    ("data.batch_size=0", "data.batch_size: expected an integer >= 1, got 0"),
    ("optimizer.lr=-1", "optimizer.lr: expected a number > 0, got -1.0"),
    ("train.epochs=2.5", "train.epochs: expected an integer, got 2.5"),
    ("data.shuffle=maybe", "data.shuffle: expected true or false, got 'maybe'"),
    ("checkpoint.monitor=val_los", "checkpoint.monitor: expected one of val_loss"),
    ("train=3", "train: expected a mapping, got 3"),
    ("train.epochs", "expected an override of the form section.key=value"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.nmae: unknown key; did you mean 'model.name'"):
        load_config(write(tmp_path, "model: {nmae: mlp}\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_a_docstring():
    for section in [Config, *(type(v) for v in vars(Config()).values() if hasattr(v, "__dataclass_fields__"))]:
        docs = field_docs(section)
        missing = [f for f in section.__dataclass_fields__ if f not in docs]
        assert not missing, f"{section.__name__} fields without a docstring: {missing}"


def test_round_trip_through_dict():
    cfg = load_config(ROOT / "configs" / "digits.yaml", ["train.epochs=3"])
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "train.epoch: unknown key; did you mean 'train.epochs'?"),
    ("model.name=resnet9000", "model.name: unknown model 'resnet9000'"),
    ("model.args={widht: 8}", "model.args.widht: unknown argument; did you mean 'model.args.width'?"),
    ("loss.args={label_smoothing: 1.5}", "label_smoothing must be in [0, 1)"),
    ("model.name=no_such_module:f", "model.name: cannot import module 'no_such_module'"),
    ("scheduler.args={patiense: 2}", "scheduler.args.patiense: unknown argument; did you mean 'scheduler.args.patience'?"),
])
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path, override, message):
    out = subprocess.run([sys.executable, "-m", "distrain", "train", "--config",
                          str(ROOT / "configs" / "digits.yaml"), f"run.out_dir={tmp_path}",
                          "checkpoint.resume=none", override],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distrain: config error: "), out.stderr
    assert message in lines[0]
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_dict_overrides_merge_and_null_clears(tmp_path):
    path = write(tmp_path, "model: {name: small_cnn, args: {width: 8, batch_norm: true}}\n"
                           "loss: {name: ldam, args: {max_m: 0.3}}\n")
    cfg = load_config(path, ["model.args.width=16", "loss.name=cross_entropy", "loss.args=null"])
    assert cfg.model.args == {"width": 16, "batch_norm": True}  # one key set, the rest kept
    assert cfg.loss.args == {}
    assert load_config(path, ["model.args={width: 4}"]).model.args == {"width": 4}  # replaced
    assert load_config(path, ["data.args.split.seed=3"]).data.args == {"split": {"seed": 3}}


@pytest.mark.parametrize("overrides, message", [
    (["model.args.num_classes=5"],
     "config error: model.args.num_classes: the model gives 5 outputs per sample, but the labels "
     "go up to 9 (10 classes); make the model's last layer 10 wide (model.args.num_classes=10)"),
    # No `targets` attribute: the first batch's labels are read, by the rank that has them.
    (["data.name=user_code:digits_longtail_without_targets", "data.args=null",
      "model.args.num_classes=5"],
     "config error: rank 0: model.args.num_classes: the model gives 5 outputs per sample"),
    (["data.batch_size=4000"],
     "config error: data.batch_size: the global batch (1 processes × 4000 × accumulation 1 = "
     "4000) is larger than the training set (1437 samples), so every epoch would be one step; "
     "use at most data.batch_size=1437"),
    (["model.name=newcomer_model:net"],
     "config error: model.name: cannot import module 'newcomer_model' (No module named "
     "'newcomer_model'); it is in plugins/, which is not on the import path: run with "
     "PYTHONPATH=plugins"),
])
def test_a_newcomers_mistakes_are_one_line_naming_the_key(tmp_path, monkeypatch, capsys,
                                                           no_dist_env, overrides, message):
    from distrain.commands.cli import main

    (tmp_path / "plugins").mkdir()  # a user's module, in a folder not on the import path
    (tmp_path / "plugins" / "newcomer_model.py").write_text("def net():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", str(ROOT / "configs" / "digits.yaml"),
                 f"run.out_dir={tmp_path / 'run'}",
                 "logging.plot=false", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("distrain: "), err
    assert message in err[0], err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


@pytest.mark.parametrize("given, moved", [
    ("backend=torchrun", "backend: moved to dist.backend (every distribution setting is under "
                         "dist); write dist.backend=torchrun"),
    ("horovod.op=adasum", "horovod.op: moved to dist.horovod.op"),
    ("fsdp.cpu_offload=true", "write dist.fsdp.cpu_offload=true")])
def test_a_key_of_distrain_0_1_outside_dist_is_refused_with_its_new_place(tmp_path, given, moved):
    with pytest.raises(ConfigError, match="^" + moved.split(" (")[0] if "(" in moved else moved):
        load_config(None, [given])
    section, rest = given.split("=")[0].split(".", 1) if "." in given.split("=")[0] else \
        (given.split("=")[0], None)
    value = given.split("=")[1]
    yaml_text = f"{section}: {value}\n" if rest is None else f"{section}:\n  {rest}: {value}\n"
    out = subprocess.run([sys.executable, "-m", "distrain", "check", "--config",
                          str(write(tmp_path, yaml_text))], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert moved in out.stderr and out.stderr.count("\n") == 1, out.stderr
    # Under dist it is what it was at the top.
    cfg = load_config(None, [f"dist.{given}"])
    assert str(getattr(cfg.dist, section) if rest is None else
               getattr(getattr(cfg.dist, section), rest)).lower() == value


def test_a_checkpoint_config_of_distrain_0_1_reads_and_compares_under_dist():
    from distrain.components.checkpoint.store import config_changes

    old = Config().to_dict()
    dist = old.pop("dist")
    old.update(backend="horovod", horovod={**dist.pop("horovod"), "op": "adasum"},
               fsdp=dist.pop("fsdp"), dist=dist)  # the layout distrain 0.1 wrote
    cfg = config_from_dict(old)
    assert (cfg.dist.backend, cfg.dist.horovod.op) == ("horovod", "adasum")
    now = Config()
    now.dist.horovod.commit_every_steps = 3  # resumable: not a change
    assert config_changes(old, now.to_dict()) == ["dist.horovod.op: 'adasum' → 'average'"]


def test_a_config_yaml_written_by_a_run_of_distrain_0_1_still_reads(tmp_path, capsys):
    """`distrain evaluate --config runs/<run>/config.yaml` of an earlier run: a whole dump
    with backend, horovod and fsdp at the top is read as under dist, with a warning."""
    import yaml

    old = Config().to_dict()
    dist = old.pop("dist")
    old.update(backend="torchrun", horovod={**dist.pop("horovod"), "compression": "fp16"},
               fsdp=dist.pop("fsdp"), dist=dist)
    cfg = load_config(write(tmp_path, yaml.safe_dump(old)))
    assert (cfg.dist.backend, cfg.dist.horovod.compression) == ("torchrun", "fp16")
    assert "has backend, fsdp, horovod outside dist (written by distrain 0.1)" in \
        capsys.readouterr().err


def test_the_commands_quick_exit_keeps_files_threads_and_the_exit_status(tmp_path):
    """`distrain ...` skips Python's teardown after a main() that succeeded (seconds a rank):
    what a plugin wrote to a file it never closed is not lost, a worker thread it left
    running finishes, and the exit status is main()'s. An object's __del__, which only the
    teardown runs, shows which exit was taken."""
    (tmp_path / "leaky.py").write_text(
        "import os, threading\n"
        f"LOG = open({str(tmp_path / 'log.txt')!r}, 'w')\n"
        "LOG.write('unclosed\\n')\n"
        "class Torn:\n"
        "    def __del__(self, open=open):  # builtins are gone by then\n"
        f"        open({str(tmp_path / 'torn.txt')!r}, 'w').write('torn down')\n"
        "TORN = Torn()\n"
        "def late():\n"
        "    threading.main_thread().join()  # alive until the main thread ends\n"
        f"    open({str(tmp_path / 'thread.txt')!r}, 'w').write('done')\n"
        "if os.environ.get('WITH_THREAD'):\n"
        "    threading.Thread(target=late).start()\n")
    script = "import sys, leaky; from distrain.commands.cli import entry; entry()"

    def command(*args: str, **env: str):
        for name in ("log.txt", "torn.txt", "thread.txt"):
            (tmp_path / name).unlink(missing_ok=True)
        return subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, **env})

    quick = command("config", "--schema")
    assert quick.returncode == 0 and "data.batch_size" in quick.stdout, quick.stderr
    assert (tmp_path / "log.txt").read_text() == "unclosed\n"  # flushed before os._exit
    assert not (tmp_path / "torn.txt").exists()  # the quick exit was taken
    for env in ({"WITH_THREAD": "1"}, {"DISTRAIN_QUICK_EXIT": "0"}):
        ordinary = command("config", "--schema", **env)
        assert ordinary.returncode == 0 and ordinary.stdout == quick.stdout, ordinary.stderr
        assert (tmp_path / "torn.txt").read_text() == "torn down", env
        assert (tmp_path / "log.txt").read_text() == "unclosed\n"
        assert (tmp_path / "thread.txt").exists() == ("WITH_THREAD" in env)  # it finished
    bad = command("check", "--config", "nowhere.yaml")
    assert bad.returncode == 2 and bad.stderr.startswith("distrain: config error"), bad.stderr
    assert (tmp_path / "torn.txt").read_text() == "torn down"  # a failure: the ordinary exit
