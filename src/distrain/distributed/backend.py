"""The backend interface, and the one-process backend that implements it trivially.

A backend owns rank, local rank, world size and device, the process group, the
model/optimizer wrappers and the collectives the loop needs; the loop never imports
torch.distributed or horovod itself. The wrappers and the collectives are abstract: a new
backend that forgets one cannot be instantiated (instead of inheriting a collective that
silently does nothing); tests/test_backends.py runs every collective and op on each.
"""

from __future__ import annotations

import abc
import contextlib
import socket
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from distrain.distributed.guard import MainOnlyGuard
from distrain.errors import ConfigError

COLLECTIVE_SLACK_S = 60.0  # collectives time out this long after distrain's watchdog fires

# The model's repeated blocks, found by the caller (components.blocks): the unit FSDP shards.
BlocksOf = Callable[[nn.Module], list[nn.Module]]


class WrappedModel(nn.Module):
    """What `Engine.setup` returns where the backend wraps the model (DDP): the forward goes
    through the wrapper, which syncs the gradients; the state dict, attributes and train/eval
    are the user's own module's, so checkpoints load into the plain model unchanged."""

    def __init__(self, module: nn.Module, wrapper: nn.Module) -> None:
        super().__init__()
        self.module = module
        object.__setattr__(self, "wrapper", wrapper)  # not a submodule: no second copy of params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper(*args, **kwargs)

    def train(self, mode: bool = True) -> WrappedModel:
        self.wrapper.train(mode)
        return super().train(mode)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.load_state_dict(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("module", "wrapper") or "_modules" not in self.__dict__:
                raise  # half-built (e.g. while copied): no recursion through self.module
            return getattr(self.module, name)


OPS = ("sum", "mean", "max", "min")  # reduction ops every backend supports


class Backend(abc.ABC):
    """What the loop and the engine call; see LocalBackend for the one-process meaning."""

    name = "abstract"
    elastic = False  # Horovod elastic: workers may join mid-run, so set-up runs no collective
    strategy = "ddp"  # every rank holds all weights (fsdp: FSDPBackend shards them)
    # What differs by strategy is asked of the strategy, never tested by its name: each of
    # these (and the methods under "state" below) is overridden where a strategy differs.
    forward_is_collective = False  # FSDP: a forward gathers weights, so every rank runs it
    sharded_checkpoints = False  # FSDP: each rank writes its shards (a .dcp folder)
    counts_backward_passes = False  # Horovod: its optimizer syncs every Nth backward

    def __init__(self, device: str = "auto", timeout_s: float = 600.0, debug: bool = False,
                 sum_grads: bool = True) -> None:
        self.timeout_s = timeout_s  # dist.timeout_s; the process group's bound is a bit later
        self.guard = MainOnlyGuard() if debug else None
        self.rank = 0
        self.local_rank = 0
        self.world_size = 1
        self.local_world_size = 1
        self._device_choice = device
        self.device = torch.device("cpu")
        self.sum_grads = sum_grads  # see loss_factor

    # -- rank vocabulary
    @property
    def is_main(self) -> bool:
        """Global rank 0: writes files and makes the run's decisions."""
        return self.rank == 0

    @contextlib.contextmanager
    def main_only(self, region: str) -> Iterator[None]:
        """Code only rank 0 runs; in dist.debug mode a collective in it raises instead of
        hanging. Use as `if backend.is_main: with backend.main_only("what"): ...`."""
        if self.guard is None:
            yield
        else:
            with self.guard.main_only(region):
                yield

    # -- lifecycle
    def setup(self) -> None:
        self.device = self._pick_device()
        self.install_guard()

    def teardown(self) -> None:
        self.uninstall_guard()

    def install_guard(self) -> None:
        if self.guard is not None:
            self.guard.install()

    def uninstall_guard(self) -> None:
        if self.guard is not None:
            self.guard.uninstall()

    def _pick_device(self) -> torch.device:
        cuda = torch.cuda.is_available()
        if self._device_choice == "cuda" and not cuda:
            raise ConfigError("run.device: expected a visible CUDA device, got 'cuda' but "
                              "torch.cuda.is_available() is False; use run.device=auto or cpu")
        if cuda and self._device_choice != "cpu":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # -- wrappers
    @abc.abstractmethod
    def wrap_model(self, model: nn.Module, blocks: BlocksOf | None = None) -> nn.Module:
        """The model whose forward/backward syncs the gradients (or the model itself).
        `blocks(model)` lists the model's repeated blocks, for a strategy that shards or
        gathers per block (FSDP); the others never call it."""

    def setup_module(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     blocks: BlocksOf | None = None) -> nn.Module:
        """wrap_model, with `optimizer` stepping the parameters the wrapped model trains
        (FSDP replaces them by sharded ones: it points the optimizer at those)."""
        return self.wrap_model(model, blocks)

    def inference_module(self, model: nn.Module, blocks: BlocksOf | None = None) -> nn.Module:
        """The model as forwards without a backward need it (`distrain evaluate`): itself,
        or sharded where a forward is a collective."""
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's own module behind what wrap_model (or Engine.setup) returned."""
        return model.module if isinstance(model, WrappedModel) else model

    @abc.abstractmethod
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       grad_accum_steps: int) -> torch.optim.Optimizer:
        """The optimizer that steps on synced gradients (or the optimizer itself)."""

    def set_accumulation(self, optimizer: torch.optim.Optimizer, accum: int) -> None:
        """Micro-batches per optimizer step from now on (Horovod elastic changes it to keep
        the global batch); a no-op where the optimizer does not count backward passes."""

    def fused_optimizer_ok(self) -> bool:
        """Whether the optimizer may use PyTorch's fused kernels under this strategy."""
        return True

    def replica_checksum(self, model: nn.Module) -> float | None:
        """A checksum of the weights every rank must hold alike (dist.audit_every_steps);
        None where each rank holds other weights by design (FSDP's shards)."""
        return param_checksum(self.unwrap(model))

    def loss_factor(self) -> int:
        """What each rank's loss is multiplied by so that the synced gradient is the global
        batch's mean: 1 where the gradient allreduce sums (the loss is already divided by
        world_size: no averaging pass over every gradient after the sum), world_size where it
        averages. fp16 averages: a loss divided by world_size would push its half-precision
        activation gradients log2(world_size) bits closer to underflow."""
        return 1 if self.sums_gradients() else self.world_size

    def sums_gradients(self) -> bool:
        """The one rule for the gradient sync: sum gradients of losses already divided by
        world_size (no averaging pass after the sum), except under fp16 (`sum_grads` false),
        and wherever a backend's options need its own averaging (Horovod)."""
        return self.sum_grads

    @abc.abstractmethod
    def no_sync(self, model: nn.Module) -> ContextManager:
        """Inside: backward accumulates locally without an allreduce."""

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Finish the gradient allreduce before unscale/clip (a no-op where backward did it)."""

    def skip_synchronize(self, optimizer: torch.optim.Optimizer) -> ContextManager:
        """Inside: optimizer.step() must not allreduce again."""
        return contextlib.nullcontext()

    def can_drop_step(self) -> bool:
        """Whether a global batch can be dropped after its backward (Engine.skip_step)."""
        return True

    # -- collectives (every rank must call them, never under `if is_main`); op: OPS
    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", name: str | None = None
                   ) -> torch.Tensor:
        """Reduce `tensor` in place over all ranks; returns it. `name`: the same for repeats
        of one reduction (Horovod's response cache then skips the negotiation)."""

    @abc.abstractmethod
    def all_reduce_async(self, tensor: torch.Tensor, op: str = "sum") -> Callable[[], torch.Tensor]:
        """Start an allreduce; the returned function waits for it and returns the result."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `tensor` into every rank's, in place; returns it."""

    @abc.abstractmethod
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable `obj` on every rank."""

    @abc.abstractmethod
    def all_gather_object(self, obj: Any) -> list:
        """Every rank's `obj`, by rank."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Wait for every rank."""

    def weighted_mean(self, values: Any, count: int) -> Any:
        """The mean over all ranks of per-rank means `values` (a number or a tuple/list of
        them), each rank weighted by its sample `count`: the exact mean over the whole set,
        bit-identical on every rank (rank 0's bits are broadcast, so decisions agree)."""
        many = isinstance(values, (tuple, list))
        row = [float(v) * count for v in (values if many else (values,))] + [float(count)]
        packed = torch.tensor(row, dtype=torch.float64, device=self.device)
        self.all_reduce(packed)
        self.broadcast(packed)
        means = (packed[:-1] / packed[-1].clamp(min=1)).tolist()
        return type(values)(means) if many else means[0]

    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        """Make every rank's parameters and buffers equal to rank `src`'s."""
        for tensor in [*module.parameters(), *module.buffers()]:
            self.broadcast(tensor.data, src)

    def broadcast_training_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                                 ) -> None:
        """After rank 0 loaded a checkpoint: give every rank its weights and optimizer state."""
        state = self.broadcast_object(optimizer.state_dict() if self.is_main else None)
        if not self.is_main:
            load_in_place(optimizer, state)
        self.broadcast_module(self.unwrap(model))

    # -- state, in one format whatever the strategy: the plain model's state dict and torch's
    #    optimizer state dict (by parameter index). FSDP gathers and scatters its shards.
    def module_state(self, model: nn.Module) -> dict:
        """The whole model's state dict, on rank 0 (a collective where the state is sharded;
        elsewhere every rank returns its own)."""
        return self.unwrap(model).state_dict()

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """torch's optimizer state dict of the whole model (by index), on rank 0."""
        return optimizer.state_dict()

    def load_module_state(self, model: nn.Module, state: dict | None) -> None:
        """A whole-model state dict into this rank's model; a rank given None keeps its
        weights (FSDP: rank 0's `state` is scattered, each rank taking its shards)."""
        if state is not None:
            self.unwrap(model).load_state_dict(state)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict | None) -> None:
        """torch's optimizer state dict into this rank's optimizer (as load_module_state)."""
        if state is not None:
            load_in_place(optimizer, state)

    def load_training_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                            model_state: dict | None, optimizer_state: dict | None) -> None:
        """A checkpoint's states, read by rank 0 (others pass None), into every rank's model
        and optimizer. Under an elastic horovodrun every rank read them: no collective.
        A state that does not fit (another model) raises on every rank, not rank 0's alone."""
        problem = None
        try:
            self.load_module_state(model, model_state)
            self.load_optimizer_state(model, optimizer, optimizer_state)
        except (RuntimeError, ValueError, KeyError) as exc:
            if self.elastic:
                raise
            problem = f"{type(exc).__name__}: {exc}"
        if not self.elastic:
            problem = self.broadcast_object(problem)  # Distribution: all raise alike
            if problem:
                raise RuntimeError(f"loading the checkpoint's model/optimizer state: {problem}")
            self.broadcast_training_state(model, optimizer)

    # -- instrumentation (distrain bench)
    def count_gradient_syncs(self) -> Callable[[], int]:
        """A function returning the number of gradient allreduce calls so far (DDP: its
        buckets, Horovod: its tensors); 0 where nothing is synced."""
        return lambda: 0

    def sync_text(self) -> str:
        """How the ranks keep and sync the weights, in words (the run's first line)."""
        return "nothing to sync"

    def summary(self) -> str:
        """One line for the start of a run: how many processes, how they sync, the device."""
        n = self.world_size
        return f"{n} process{'es' * (n > 1)} ({self.sync_text()}), device {self.device}"

    def describe(self) -> dict:
        return {"backend": self.name, "rank": self.rank, "local_rank": self.local_rank,
                "world_size": self.world_size, "local_world_size": self.local_world_size,
                "host": socket.gethostname(), "device": str(self.device)}



def load_in_place(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping its param-group dicts (updated): whatever
    holds them still steers it. torch replaces them; Horovod's optimizer is a new object
    sharing the user's optimizer's groups, so a scheduler built on the user's (before
    Engine.setup) would otherwise stop changing the LR after a resume."""
    groups = list(optimizer.param_groups)
    optimizer.load_state_dict(state)
    keep_groups(groups, optimizer)


def keep_groups(groups: list[dict], optimizer: torch.optim.Optimizer) -> None:
    """Point `optimizer` back at the param-group dicts `groups`, updated to its own values
    (after something replaced its dicts: a load, Horovod elastic's restore)."""
    for mine, now in zip(groups, optimizer.param_groups):
        if mine is not now:
            mine.update(now)
    optimizer.param_groups[:] = groups


def param_checksum(model: nn.Module) -> float:
    """A position-sensitive sum of the weights (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(model.parameters(), 1):
        total += p.detach().double().sum().cpu() * i
    return float(total)

class LocalBackend(Backend):
    """One process: every wrapper and collective is the identity."""

    name = "local"

    def wrap_model(self, model: nn.Module, blocks: BlocksOf | None = None) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       grad_accum_steps: int) -> torch.optim.Optimizer:
        return optimizer

    def no_sync(self, model: nn.Module) -> ContextManager:
        return contextlib.nullcontext()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", name: str | None = None
                   ) -> torch.Tensor:
        check_op(op)
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor, op: str = "sum") -> Callable[[], torch.Tensor]:
        result = self.all_reduce(tensor, op)
        return lambda: result

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list:
        return [obj]

    def barrier(self) -> None:
        pass


def check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"reduction op: expected one of {', '.join(OPS)}, got {op!r}")


def has_sparse_gradients(model: nn.Module) -> bool:
    """Whether `model` has an embedding that produces sparse gradients (`sparse=True`): they
    are allreduced on their own, outside DDP's flat buckets and Horovod's groups."""
    return any(m.sparse for m in model.modules()
               if isinstance(m, (nn.Embedding, nn.EmbeddingBag)))
