import pytest
import torch

from distrain.components.scheduling import Schedule
from distrain.config import SchedulerConfig
from distrain.errors import ConfigError


def schedule(name, args=None, warmup=0.0, mode="min", spe=10, total=100, lr=1.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    cfg = SchedulerConfig(name=name, args=args or {}, warmup_epochs=warmup, warmup_start_factor=0.1)
    return Schedule(opt, cfg, mode, spe, total)


def lrs(s, n):
    out = [s.lr]
    for _ in range(n):
        s.step()
        out.append(s.lr)
    return out


def test_warmup_then_cosine():
    s = schedule("cosine", {"min_lr": 0.0}, warmup=1.0)
    seq = lrs(s, 100)
    assert seq[0] == pytest.approx(0.1) and seq[5] == pytest.approx(0.55)
    assert seq[10] == pytest.approx(1.0)  # warm-up over, cosine starts at the top
    assert seq[55] == pytest.approx(0.5) and seq[100] == pytest.approx(0.0, abs=1e-12)


def test_step_and_multistep_count_epochs():
    assert lrs(schedule("step", {"step_size": 2, "gamma": 0.5}), 40)[::10] == \
        pytest.approx([1, 1, 0.5, 0.5, 0.25])
    assert lrs(schedule("multistep", {"milestones": [1, 3], "gamma": 0.1}), 40)[::10] == \
        pytest.approx([1, 0.1, 0.1, 0.01, 0.01])


def test_plateau_and_state_round_trip():
    s = schedule("plateau", {"factor": 0.5, "patience": 1, "min_lr": 0.2})
    for metric in [1.0, 1.0, 1.0]:  # improvement, then 2 bad evaluations > patience 1
        s.observe(metric)
    assert s.lr == pytest.approx(0.5)
    t = schedule("plateau", {"factor": 0.5, "patience": 1, "min_lr": 0.2})
    t.load_state_dict(s.state_dict())
    for metric in [1.0, 1.0, 1.0, 1.0]:
        s.observe(metric)
        t.observe(metric)
        assert s.lr == t.lr
    assert s.lr == pytest.approx(0.2)  # floored at min_lr


def test_bad_scheduler_args_are_config_errors():
    with pytest.raises(ConfigError, match="scheduler.args.gama: unknown argument; did you mean"):
        schedule("step", {"gama": 0.1})
    with pytest.raises(ConfigError, match="factor must be in"):
        schedule("plateau", {"factor": 2})
    with pytest.raises(ConfigError, match="scheduler.warmup_epochs: expected 0 with a custom"):
        schedule("torch.optim.lr_scheduler:ExponentialLR", {"gamma": 0.9}, warmup=1)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_custom_scheduler_by_import_path():
    # Stepped per epoch by default, as torch documents its schedulers: optimizer steps
    # leave it alone, epoch ends move it.
    s = schedule("torch.optim.lr_scheduler:ExponentialLR", {"gamma": 0.5})
    assert lrs(s, 2) == pytest.approx([1.0, 1.0, 1.0])
    s.end_epoch()
    assert s.lr == pytest.approx(0.5)
    per_step = schedule("torch.optim.lr_scheduler:ExponentialLR", {"gamma": 0.5})
    per_step.interval = "step"  # scheduler.interval=step
    assert lrs(per_step, 2) == pytest.approx([1.0, 0.5, 0.25])
