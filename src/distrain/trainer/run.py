"""`distrain train`: the run around the trainer. The backend from the config, the run
folder's lock, the watchdog, the profiler, Horovod elastic; the teardown in the right order
after a success, an error or a preemption."""

from __future__ import annotations

import gc

from distrain.components.observe.experiment import FAILED, FINISHED, KILLED
from distrain.components.observe.profiling import StepProfiler
from distrain.components.observe.runlock import RunLock, hold
from distrain.config import Config
from distrain.distributed import make_backend
from distrain.distributed.watchdog import Watchdog
from distrain.errors import Preempted
from distrain.trainer.elastic import Elastic
from distrain.trainer.loop import Trainer


def train(cfg: Config) -> dict:
    """Set up the backend from the config, train, tear down; returns the run's summary.
    Raises Preempted after SIGTERM/SIGUSR1 once last.pt holds the run."""
    backend = make_backend(cfg)
    backend.setup()
    trainer = None
    lock = RunLock(cfg.run.out_dir)
    watchdog = None
    status = FAILED  # how the trackers' runs end
    try:
        hold(lock, backend)
        watchdog = Watchdog(cfg.dist.timeout_s, backend.rank, cfg.run.out_dir).start()
        trainer = Trainer(cfg, backend, watchdog)
        trainer.profiler = StepProfiler.for_rank(cfg.logging.profile, backend.rank,
                                                 cfg.run.out_dir, backend.device)
        trainer.engine.catch_signals()  # released by engine.close()
        trainer.preemption.polled = True  # the trainer asks every step (a signal: last.pt)
        if backend.elastic:
            trainer.elastic = Elastic(trainer, lock)
            summary = trainer.elastic.run()
        else:
            summary = trainer.fit()
        if trainer.profiler is not None:
            trainer.profiler.stop()  # the last traces, and the top operators printed
        trainer.log.write_plot()  # rank 0, logging.plot: <out_dir>/curves.png
        backend.barrier()  # Distribution: leave together, after rank 0's last write
        status = FINISHED
        return summary
    except Preempted:
        status = KILLED
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
        if trainer is not None:
            if trainer.profiler is not None:
                trainer.profiler.stop(print_table=False)  # after an error: no table
            # Flush TensorBoard's event file; the trackers upload and end their runs.
            trainer.log.close(status)
        lock.release()  # rank 0's, after its last write; also after an error or a preemption
        if trainer is not None:
            # The signal handlers; fit() waited for the saves; the backend is ours to tear down.
            trainer.engine.close(wait_for_saves=False)
        # Distribution: free DDP (which holds the process group) before the group goes down;
        # a group still alive at interpreter exit can abort in gloo's worker threads.
        del trainer
        gc.collect()
        backend.teardown()
