"""The README's command blocks, run top to bottom as written, in a copy of the repository.

Every command in a ```bash block is either run (and must exit 0) or skipped here by name
with the reason, so a command added to the README without a rule fails this test.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import time

import pytest
from conftest import ROOT

# (pattern, reason): commands not run here, and why.
SKIPPED = [
    (r"^\./launcher/test\b", "the test suite itself"),
    (r"^\./launcher/run\b", "tests/test_e2e.py::test_main_job_launcher runs it (into a temporary run.out_dir)"),
    (r"^mlflow server ", "tests/test_tracking.py starts a real mlflow server and trains against it"),
    (r"^wandb sync ", "needs the network (tests/test_tracking.py reads the offline run's files)"),
    (r"examples/own_loop\.py", "tests/test_engine.py runs these layouts (python 1 × 32, torchrun "
                               "and horovodrun 2 × 16, through distrain launch) and "
                               "compares their weights"),
]
# (pattern, reason): commands whose `train --config` is run as `check --config` here (the
# config's keys and the launcher are checked, nothing is trained), and why.
CHECKED = [
    (r"train\.compile=true", "compiling costs a minute; tests/test_fsdp.py trains compiled "
                              "FSDP and DDP runs and compares their weights"),
    (r"logging\.mlflow_uri=http", "its server is not started here (see SKIPPED)"),
]
# Files a block's commands read; the copy gets these (and .venv as a link).
COPIED = ("configs", "examples", "launcher", "src", "setup.cfg", "pyproject.toml", "README.md")


def readme_commands(text: str) -> list[str]:
    """Each command of each ```bash block: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def skip_reason(command: str) -> str | None:
    return next((reason for pattern, reason in SKIPPED if re.search(pattern, command)), None)


@pytest.mark.timeout(1200)  # some twenty launches, each a few seconds of start-up
def test_every_readme_command_runs_as_written(tmp_path):
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) >= 15, commands  # the blocks were found
    work = tmp_path / "distrain"
    work.mkdir()
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, work / name)
    (work / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    ran, skipped, said = [], [], {}
    for command in commands:
        if (reason := skip_reason(command)) is not None:
            skipped.append((command, reason))
            continue
        if command == "source .venv/bin/activate":
            env["VIRTUAL_ENV"] = str(work / ".venv")
            env["PATH"] = f"{work / '.venv' / 'bin'}:{env['PATH']}"
            continue
        if command.startswith("export "):
            for pair in shlex.split(command)[1:]:
                key, _, value = pair.partition("=")
                env[key] = value
            continue
        if any(re.search(pattern, command) for pattern, _ in CHECKED):
            command = re.sub(r"(^|\s)train(\s+--config)", r"\1check\2", command)
        began = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        print(f"{time.perf_counter() - began:6.1f} s  {command}", flush=True)
        said[command] = done.stdout
        assert done.returncode == 0, f"README command failed: {command}\n{done.stdout[-3000:]}" \
                                     f"\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-3000:]}"
        ran.append(command)
    # The main job learns, and rank 0 alone prints: one line per epoch, one closing line.
    rows = [json.loads(line) for line in (work / "runs" / "digits" / "metrics.jsonl")
            .read_text().splitlines()]
    assert len(rows) == 20 and rows[-1]["val_acc"] >= 0.95, rows[-1]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] / 5
    first = said["distrain launch train --config configs/digits.yaml"]
    assert len(re.findall(r"^epoch +1 \|", first, re.M)) == 1
    assert len(re.findall(r"^distrain: done", first, re.M)) == 1
    # examples/my_project.py: a user's data set, model and loss named by import path, learn.
    rows = [json.loads(line) for line in (work / "runs" / "my_project" / "metrics.jsonl")
            .read_text().splitlines()]
    assert rows[-1]["val_acc"] >= 0.95, rows[-1]
    # What the commands said they wrote is there.
    assert (work / "model.safetensors").stat().st_size > 0
    assert (work / "compare.png").stat().st_size > 0
    for run in ("digits-one", "digits-lr", "digits-hvd", "digits-mpi", "tokens_gpt_fsdp",
                "digits-eval"):
        assert (work / "runs" / run / "metrics.jsonl").read_text().strip(), run
    assert (work / "metrics.json").exists() and (work / "predictions.csv").exists()
    assert (work / "runs" / "digits-wandb" / "wandb").is_dir()
    assert len(list((work / "runs" / "digits-profile" / "profile").glob("*.pt.trace.json"))) == 2
    assert len(ran) >= 19 and len(skipped) == 7, (ran, skipped)
