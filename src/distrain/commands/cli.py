"""`distrain train|check|evaluate|predict --config FILE [section.key=value ...]`, `launch`,
`plot`, `export`, `config --schema`.

    distrain train --config configs/digits.yaml train.epochs=3
    distrain launch --nproc 2 train --config configs/digits.yaml   # torchrun, horovodrun, mpirun
    distrain check --config configs/digits.yaml      # resolved config + environment, no training
    distrain plot runs/a runs/b -o compare.png       # learning curves of runs, overlaid
    distrain config --schema [--markdown]            # every config key: type, default, meaning
    distrain export runs/digits -o model.safetensors # the best weights, one file (DDP or FSDP)
    distrain evaluate --config configs/digits.yaml --checkpoint best   # its metrics, as JSON
    distrain predict --config configs/digits.yaml --checkpoint best -o predictions.csv
"""

from __future__ import annotations

import argparse
import json
import sys

from distrain.config import dump_yaml, load_config
from distrain.errors import (
    CheckpointError,
    CollectiveInMainOnlyRegion,
    ConfigError,
    DivergenceError,
    LabelError,
    NonFiniteError,
    PluginError,
)

EXIT_CONFIG = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, last.pt written; launch again to resume


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train a model from a YAML config"),
                            ("check", "validate the config, print it and the detected "
                                      "environment; train nothing")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", default=None, help="YAML file (defaults apply without)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="overrides, values parsed as YAML (e.g. train.epochs=3)")
    for name, help_text in (("evaluate", "validate a checkpoint as training does and print "
                                         "its metrics as one JSON line; train nothing"),
                            ("predict", "write a checkpoint's prediction for every validation "
                                        "sample to a CSV file")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", default=None, help="YAML file (defaults apply without)")
        p.add_argument("--checkpoint", required=True,
                       help="best, last or a step checkpoint's name (in <run.out_dir>/"
                            "checkpoints), a .pt file or .dcp folder, or a run folder (its best)")
        p.add_argument("--output", "-o", required=name == "predict",
                       help="the CSV file to write" if name == "predict" else
                            "also write the metrics to this JSON file")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="overrides, values parsed as YAML (e.g. validate.mode=sharded)")
    sub.add_parser("launch", add_help=False, help="run a job (train ..., or a script) under "
                   "torchrun, horovodrun or mpirun: distrain launch --help")
    p = sub.add_parser("plot", help="draw the learning curves of one or more runs into a PNG")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (run.out_dir)")
    p.add_argument("--output", "-o", default=None,
                   help="PNG file to write (default: <first RUN_DIR>/curves.png)")
    p = sub.add_parser("bench", help="benchmark distrain against hand-written loops and raw "
                                     "collectives; writes bench.json and bench.png")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.png")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not figures)")
    p.add_argument("--only", nargs="+", default=None, metavar="CASE",
                   help="run only these cases (overhead scaling accumulation sync checkpoint "
                        "startup fsdp compile peers recipe gpu)")
    p = sub.add_parser("export", help="write a run's weights (best by default) to one "
                                      "safetensors file, from a DDP or a sharded FSDP run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder (run.out_dir)")
    p.add_argument("--output", "-o", required=True, help="the .safetensors file to write")
    p.add_argument("--checkpoint", default=None,
                   help="best (default), last, a step checkpoint's name or a path")
    p = sub.add_parser("config", help="describe the configuration keys")
    p.add_argument("--schema", action="store_true",
                   help="print every key with its type, default and description")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table")
    return parser


def _plot(args) -> int:
    from distrain.components.observe.plot import plot_runs
    from distrain.errors import PlotError

    try:
        out = plot_runs(args.run_dirs, args.output)
    except PlotError as exc:
        print(f"distrain: plot error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"distrain: wrote {out}")
    return 0


def _config(args, parser: argparse.ArgumentParser) -> int:
    from distrain.config.schema import format_markdown, format_text

    if not args.schema:
        parser.error("config: nothing to do; pass --schema (and --markdown for a table)")
    print(format_markdown() if args.markdown else format_text(), end="")
    return 0


def _export(args) -> int:
    from distrain.commands.export import export

    try:
        source = export(args.run_dir, args.output, args.checkpoint)
    except ConfigError as exc:
        print(f"distrain: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"distrain: wrote {args.output} from {source}")
    return 0


def _evaluate(cfg, args) -> int:
    from distrain.commands.evaluate import evaluate, predict, write_atomic
    from distrain.distributed.environment import launcher_rank

    if args.command == "predict":
        result = predict(cfg, args.checkpoint, args.output)
    else:
        result = evaluate(cfg, args.checkpoint)
    if launcher_rank() == 0:  # every rank holds the result; rank 0 says it
        line = json.dumps(result)
        if args.command == "evaluate" and args.output:
            write_atomic(args.output, line + "\n")
        print(line, flush=True)
    return 0


def _check(cfg) -> int:
    from distrain.distributed import make_backend, versions

    backend = make_backend(cfg)
    backend.setup()
    try:
        layout = backend.all_gather_object(backend.describe())
        if backend.is_main:
            print("# resolved config")
            print(dump_yaml(cfg), end="")
            print("# environment")
            print(json.dumps({"backend": backend.name, "world_size": backend.world_size,
                              "versions": versions()}, indent=2))
            print("# rank layout")
            for info in layout:
                print("  rank {rank} local_rank {local_rank} host {host} device {device}"
                      .format(**info))
    finally:
        backend.teardown()
    return 0


def _bench(args: argparse.Namespace) -> int:
    from distrain.tools.bench import CASES, run

    unknown = [c for c in args.only or [] if c not in CASES]
    if unknown:
        print(f"distrain: config error: --only: unknown case {unknown[0]!r}; expected one of "
              f"{', '.join(CASES)}", file=sys.stderr)
        return EXIT_CONFIG
    run(args.out, args.quick, args.only)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # its job's arguments are the job's, not ours to parse
        from distrain.commands.launch import main as launch

        return launch(argv[1:])
    parser = _parser()
    # Overrides may come after an option too (`evaluate --checkpoint best validate.mode=sharded`).
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    if args.command == "bench":
        return _bench(args)
    if args.command == "plot":
        return _plot(args)
    if args.command == "config":
        return _config(args, parser)
    if args.command == "export":
        return _export(args)
    from distrain.distributed.environment import launcher_rank  # torch: not for launch, plot

    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "check":
            return _check(cfg)
        if args.command in ("evaluate", "predict"):
            return _evaluate(cfg, args)
        from distrain.errors import Preempted
        from distrain.trainer.run import train

        try:
            train(cfg)
        except Preempted as exc:
            if launcher_rank() == 0:
                print(f"distrain: preempted: {exc}; checkpoint written to "
                      f"{cfg.run.out_dir}/checkpoints/"
                      f"{'last.dcp' if cfg.dist.strategy == 'fsdp' else 'last.pt'}, launch "
                      "again to resume",
                      file=sys.stderr)
            return EXIT_PREEMPTED
        return 0
    except DivergenceError as exc:
        if launcher_rank() == 0:  # every rank raises it with the same message
            print(f"distrain: error: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, NonFiniteError, CollectiveInMainOnlyRegion) as exc:
        print(f"distrain: error: {exc}", file=sys.stderr)
        return 1
    except PluginError as exc:  # possibly on one rank only: each rank that raised says so
        print(f"distrain: error: rank {launcher_rank()}: {exc}", file=sys.stderr)
        return 1
    except LabelError as exc:  # maybe found on this rank alone
        print(f"distrain: config error: rank {launcher_rank()}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        if launcher_rank() == 0:  # every rank finds the same mistake; say it once
            print(f"distrain: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def entry() -> None:
    """The `distrain` command and `python -m distrain`: main(), then an exit without Python's
    interpreter teardown, which takes a process that imported torch ~1.5-2.5 s (its modules'
    destruction; every launch pays it once per rank). Exit handlers still run (DataLoader
    workers, Horovod, logging), MPI is finalized, Python's open files and C's stdio buffers
    are flushed; objects' __del__ do not run (a gzip or zip file a plugin never closed stays
    without its end). A failure gets the ordinary exit: the first rank out makes torchrun
    stop the others, so its seconds are what lets every rank that has something to say say
    it; so does a live thread of the user's, and DISTRAIN_QUICK_EXIT=0 (profilers, coverage
    tools that write at teardown)."""
    import atexit
    import ctypes
    import gc
    import io
    import os
    import threading

    code = main()
    if code != 0 or os.environ.get("DISTRAIN_QUICK_EXIT", "1") == "0" or any(
            t.is_alive() and not t.daemon for t in threading.enumerate()
            if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")  # mpi4py finalizes in C at teardown; mpirun wants it
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    files = (io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)
    for obj in gc.get_objects():  # a file a plugin never closed keeps what it wrote
        if issubclass(type(obj), files):  # type(), not isinstance: no proxy's __class__ runs
            try:
                obj.flush()
            except ValueError:  # closed, or not writable
                pass
            except OSError as exc:  # a full disk, a closed pipe: say it, as teardown would
                os.write(2, f"distrain: warning: a file not flushed at exit: {exc}\n".encode())
    ctypes.CDLL(None).fflush(None)  # C and C++ extensions' buffered stdio (piped: not tty)
    os._exit(code)


if __name__ == "__main__":
    entry()
