"""Data-parallel training steps on the CPU: each batch split into shards, one thread each.

Why: mnistkit's models are so small that PyTorch's intra-op threads gain little on them (each op
is a millisecond or less, and its threads spin and wait between ops); two training processes of
one thread each ran about twice as fast together as one process with two threads. A sharded
step gets that inside one run: shard i is trained by its own thread with one intra-op thread,
on a replica of the model whose weights are the model's, and the gradients are added up.

What stays the same as one thread over the whole batch, up to rounding: the loss (each shard's
mean is weighted by its share of the batch), the gradients, BatchNorm (its statistics are the
whole batch's: the shards add up their sums in ``fused._SyncBNReLU``, which needs mnistkit's
C kernel), the optimizer step, gradient clipping and the running statistics. What differs:
Dropout draws its masks from one generator per shard (``ShardDropout``), seeded from the run's
seed, so a sharded run is reproducible for its number of shards but is not the same run as an
unsharded one. The generators' states are part of a resumable checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mnistkit import fused

__all__ = ["ShardDropout", "ShardedStep", "step_threads"]


class ShardDropout(nn.Dropout):
    """``nn.Dropout`` that, inside a sharded step, draws its mask from the shard's generator
    (the same computation as PyTorch's CPU dropout: a Bernoulli mask scaled by 1 / (1 - p));
    elsewhere it is ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        generator = getattr(fused.shard, "generator", None)
        if not self.training or self.p == 0 or generator is None:
            return super().forward(x)
        noise = torch.empty_like(x).bernoulli_(1 - self.p, generator=generator).div_(1 - self.p)
        return x.mul_(noise) if self.inplace else x * noise


def _shard_dropout(model: nn.Module) -> None:
    """Every ``nn.Dropout`` of ``model`` becomes a ``ShardDropout`` (no parameters or buffers:
    the state_dict is unchanged)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, ShardDropout(child.p, child.inplace))


@contextlib.contextmanager
def step_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op threads of the calling thread set to ``n`` for the block, then restored."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ShardedStep:
    """Train ``model`` with each batch split into ``shards`` row blocks (sizes differ by at most
    one), shard 0 on the calling thread and the others on a pool of threads, each thread with
    ``threads`` intra-op threads. Call it like ``training.train_step``; the caller runs it inside
    ``step_threads(threads)``. The model's ``nn.Dropout`` modules become ``ShardDropout`` (no
    parameters or buffers change); ``close`` stops the thread pool."""

    def __init__(self, model: nn.Module, shards: int, seed: int, threads: int = 1) -> None:
        if shards < 2:
            raise ValueError("a sharded step needs at least 2 shards")
        _shard_dropout(model)
        self.model, self.shards, self.threads = model, shards, threads
        self.replicas = [copy.deepcopy(model) for _ in range(shards - 1)]
        self._params = list(model.parameters())
        self._replica_params = [list(r.parameters()) for r in self.replicas]
        self.generators = [torch.Generator().manual_seed((seed * 1_000_003 + i) % 2**63) for i in range(shards)]
        self._sync = fused.Rendezvous(shards)
        self._pool = ThreadPoolExecutor(shards - 1, thread_name_prefix="mnistkit-shard",
                                        initializer=torch.set_num_threads, initargs=(threads,))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def rng_state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def set_rng_state(self, states: list[torch.Tensor]) -> None:
        if not isinstance(states, list) or len(states) != self.shards:
            raise ValueError(f"expected the states of {self.shards} shard generators")
        for g, state in zip(self.generators, states):
            g.set_state(state)

    def _run(self, index: int, module: nn.Module, sync: fused.Rendezvous, x: torch.Tensor, y: torch.Tensor,
             weight: float, label_smoothing: float, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        fused.shard.sync, fused.shard.index, fused.shard.generator = sync, index, self.generators[index]
        try:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = module(x)
                loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
            (loss * weight).backward()
            return loss.detach() * weight, (out.detach().argmax(1) == y).sum()
        except BaseException:
            sync.abort()   # the other shards stop waiting for this one
            raise
        finally:
            fused.shard.sync = fused.shard.index = fused.shard.generator = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 label_smoothing: float = 0.0, bf16: bool = False, channels_last: bool = False,
                 grad_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n = len(y)
        optimizer.zero_grad(set_to_none=True)
        if n < 2 * self.shards:   # too few rows to split (a last, short batch): one shard, whole batch
            loss, hits = self._run(0, self.model, fused.Rendezvous(1), x, y, 1.0, label_smoothing, bf16)
        else:
            bounds = [n * i // self.shards for i in range(self.shards + 1)]
            with torch.no_grad():
                for params in self._replica_params:
                    torch._foreach_copy_(params, self._params)
                    for p in params:
                        p.grad = None
            self._sync.reset()
            futures = [self._pool.submit(self._run, i, self.replicas[i - 1], self._sync, x[bounds[i]:bounds[i + 1]],
                                         y[bounds[i]:bounds[i + 1]], (bounds[i + 1] - bounds[i]) / n,
                                         label_smoothing, bf16)
                       for i in range(1, self.shards)]
            errors: list[BaseException] = []
            try:
                loss, hits = self._run(0, self.model, self._sync, x[:bounds[1]], y[:bounds[1]], bounds[1] / n,
                                       label_smoothing, bf16)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, once every shard has stopped
                errors.append(exc)
            while True:   # every shard has stopped before this step ends, whatever happened
                try:
                    wait(futures)
                    break
                except BaseException as exc:  # noqa: BLE001 - Ctrl-C while waiting: stop the others too
                    errors.insert(0, exc)
                    self._sync.abort()
            results = []
            for f in futures:
                try:
                    results.append(f.result())
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)
            if errors:
                self._sync = fused.Rendezvous(self.shards)   # a broken barrier stays broken
                # the error that broke the step, not the BrokenBarrierError it caused in the others
                raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
            with torch.no_grad():
                for params in self._replica_params:   # in shard order: the same sums every run
                    for p, q in zip(self._params, params):
                        if q.grad is not None:
                            if p.grad is None:
                                p.grad = q.grad
                            else:
                                p.grad.add_(q.grad)
            for part_loss, part_hits in results:
                loss, hits = loss + part_loss, hits + part_hits
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip, foreach=True)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return loss, hits
