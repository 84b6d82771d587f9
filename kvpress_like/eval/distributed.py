"""Run a grid on a Ray cluster: the same units, records and ``cells.jsonl`` as :func:`.runner.run_grid`.

The driver (this process) plans the units exactly as a local run does (:func:`.runner.pending_units`,
so a run resumes from ``cells.jsonl`` whichever runner wrote it) and needs only the tokenizer. Each
batch of units (``batch_size`` samples under one protocol, every missing (method, budget) pair sharing
one prompt forward) becomes one call on a pool of actors that each load the model once. The driver
appends each record as it arrives, so a grid started on a cluster can be resumed locally and rendered
the same way.

Faults: an actor that dies (its process killed, its node lost) fails only the batch it was running;
that batch goes back to the queue, a fresh actor replaces the dead one, and the batch runs again — at
most ``max_attempts`` times in all. A record is written only when a call returned it, so none is lost
or written twice. If the driver itself stops, running the command again resumes from ``cells.jsonl``.

Ray is optional: it is imported only when a distributed run starts (``pip install ".[ray]"``).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvpress_like.errors import KVPressLikeError
from kvpress_like.eval.grid import GridConfig, parse_settings
from kvpress_like.eval.records import CellsFile
from kvpress_like.eval.runner import (
    Built,
    Unit,
    candidates,
    open_output,
    pending_units,
    progress_bar,
    run_units,
    unit_batches,
)
from kvpress_like.eval.summary import write_summary

RAY_MISSING = 'distributed runs need Ray: pip install ".[ray]" (or pip install "kvpress_like[ray]")'
ADDRESS = re.compile(r"^(ray://)?(?P<host>[A-Za-z0-9][A-Za-z0-9.\-]*|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")
ACTOR_PREFIX = "kvpress-like-worker"

log = logging.getLogger(__name__)


class DistributedError(KVPressLikeError, RuntimeError):
    """A distributed run cannot start or go on (Ray missing, no cluster, a unit that keeps killing its actor)."""


class RaySettings(BaseModel):
    """Where and how a grid runs on Ray.

    ``address``: ``auto`` (a running cluster this machine belongs to, e.g. after ``ray start --head``),
    ``local`` (start a Ray instance inside this process), ``HOST:PORT`` (a cluster's GCS address) or
    ``ray://HOST:PORT`` (Ray Client). ``num_cpus``/``num_gpus``: resources of each actor. ``actors``:
    how many (default: as many as the cluster's resources hold, at most one per unit).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = "auto"
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    actors: int | None = Field(None, ge=1)
    max_attempts: int = Field(3, ge=1, description="runs of one unit whose actor died before it is given up")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if value in ("auto", "local"):
            return value
        match = ADDRESS.match(value)
        if match is None or not 0 < int(match.group("port")) < 65536:
            raise ValueError(
                f"{value!r} is not a Ray address: use auto, local, HOST:PORT (e.g. 10.0.0.5:6379) "
                "or ray://HOST:PORT (e.g. ray://head:10001)"
            )
        return value

    @model_validator(mode="after")
    def _countable(self) -> RaySettings:
        if not (self.num_cpus or self.num_gpus or self.actors):
            raise ValueError("actors that need neither CPUs nor GPUs cannot be counted from the cluster: set actors")
        return self


def ray_settings(**options: Any) -> RaySettings:
    """:class:`RaySettings` from keyword options; a :class:`ConfigError` names each bad one."""
    return parse_settings(RaySettings, {k: v for k, v in options.items() if v is not None}, "ray options")


def import_ray():
    """The ``ray`` module, or a :class:`DistributedError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DistributedError(RAY_MISSING) from None
    return ray


def load_tokenizer(name: str):
    """The tokenizer of a grid's model (an embedded name or a local folder), without loading the model."""
    from transformers import AutoTokenizer

    from kvpress_like.models import EMBEDDED, embedded_checkpoint

    return AutoTokenizer.from_pretrained(embedded_checkpoint(name) if name in EMBEDDED else name)


class GridWorker:
    """The body of a Ray actor: loads the grid's model once, then evaluates batches of units (``batch_size``)."""

    def __init__(self, grid: GridConfig, num_cpus: float, num_gpus: float):
        from kvpress_like.models import load_model

        torch.set_num_threads(grid.threads or max(1, round(num_cpus)))
        self.grid = grid
        self.built: Built = candidates(grid.planned_pairs())  # every pipeline once per actor
        self.model, self.tokenizer = load_model(grid.model, dtype=getattr(torch, grid.dtype))
        if num_gpus:
            self.model.to("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU(s)

    def run(self, units: list[Unit]) -> list[dict[str, Any]]:
        return run_units(self.model, self.tokenizer, self.grid, units, self.built)


def run_grid_ray(
    grid: GridConfig,
    out_dir: str | Path,
    settings: RaySettings | None = None,
    tokenizer=None,
    progress: bool = True,
    limit: int | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``grid`` into ``out_dir`` on Ray; same files and summary as :func:`.runner.run_grid`.

    ``tokenizer`` (default: loaded from ``grid.model``) only plans the units; the actors load the model.
    A Ray instance already initialised in this process is used as it is (``settings.address`` ignored).
    """
    ray = import_ray()
    settings = settings or RaySettings()
    out = open_output(grid, out_dir)
    todo = pending_units(grid, out, tokenizer or load_tokenizer(grid.model), limit)
    started = time.perf_counter()
    if todo:
        with _connected(ray, settings.address), CellsFile(out) as cells:
            pool = ActorPool(ray, grid, settings, _actor_count(ray, settings, len(todo)))
            bar = progress_bar(len(todo), grid.name, progress)
            try:
                pool.run(unit_batches(todo, grid.batch_size), cells.append, bar)
            finally:
                bar.close()
                pool.close()
    return write_summary(grid, out, time.perf_counter() - started, len(todo), command)


@contextmanager
def _connected(ray, address: str) -> Iterator[None]:
    """Connect to ``address`` unless this process already is; disconnect after, if this call connected."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address)
    except ConnectionError as error:
        raise DistributedError(
            f"cannot connect to the Ray cluster at {address!r} ({error}); start one with `ray start --head` "
            "and pass its address, or use --ray local for a Ray instance on this machine"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _actor_count(ray, settings: RaySettings, units: int) -> int:
    if settings.actors:
        return min(settings.actors, units)
    resources = ray.cluster_resources()
    needs = {"CPU": settings.num_cpus, "GPU": settings.num_gpus}
    fits = [int(resources.get(kind, 0) // need) for kind, need in needs.items() if need]
    if min(fits) < 1:
        raise DistributedError(
            f"the Ray cluster offers {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs: not "
            f"enough for one actor of {settings.num_cpus:g} CPUs and {settings.num_gpus:g} GPUs "
            "(lower --ray-num-cpus / --ray-num-gpus or add nodes)"
        )
    return min(min(fits), units)


class ActorPool:
    """``size`` :class:`GridWorker` actors, one batch of units in flight on each; dead actors are replaced."""

    def __init__(self, ray, grid: GridConfig, settings: RaySettings, size: int):
        self._ray, self._settings = ray, settings
        self._remote = ray.remote(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, max_restarts=0)(
            GridWorker
        )
        self._grid = grid
        self._run_id = uuid.uuid4().hex[:8]
        self._spawned = 0
        self.actors = [self._spawn() for _ in range(size)]
        self.retried = 0

    def _spawn(self):
        """A new actor, named ``kvpress-like-worker-<run>-<n>`` so that it can be found on the cluster."""
        self._spawned += 1
        return self._remote.options(name=f"{ACTOR_PREFIX}-{self._run_id}-{self._spawned}").remote(
            self._grid, self._settings.num_cpus, self._settings.num_gpus
        )

    def run(self, batches: list[list[Unit]], on_record: Callable[[dict[str, Any]], None], bar) -> None:
        """Evaluate every batch of units, calling ``on_record`` once per unit in the driver as results arrive."""
        ray = self._ray
        queue = deque((batch, 1) for batch in batches)
        idle = list(range(len(self.actors)))
        running: dict[Any, tuple[int, list[Unit], int]] = {}
        while queue or running:
            while queue and idle:
                slot, (batch, attempt) = idle.pop(), queue.popleft()
                running[self.actors[slot].run.remote(batch)] = (slot, batch, attempt)
            (done,), _ = ray.wait(list(running), num_returns=1)
            slot, batch, attempt = running.pop(done)
            try:
                records = ray.get(done)
            except ray.exceptions.RayActorError as error:
                self._replace(slot, batch, attempt, error)
                queue.appendleft((batch, attempt + 1))
            else:
                for record in records:
                    on_record(record)
                bar.update(len(records))
                bar.set_postfix_str(f"{len(self.actors)} actors, {self.retried} retried, {batch[-1].key}")
            idle.append(slot)

    def _replace(self, slot: int, batch: list[Unit], attempt: int, error: Exception) -> None:
        if getattr(error, "actor_init_failed", False):
            raise DistributedError(f"a worker could not start (loading model {self._grid.model!r}): {error}")
        keys = ", ".join(unit.key for unit in batch)
        if attempt >= self._settings.max_attempts:
            raise DistributedError(
                f"units {keys} lost their worker {attempt} times (out of memory?); the finished units are in "
                f"cells.jsonl, run again to resume: {error}"
            )
        log.warning("the worker running units %s died; running them again on a new worker (attempt %d of %d): %s",
                    keys, attempt + 1, self._settings.max_attempts, str(error).splitlines()[0])
        self.retried += 1
        self._ray.kill(self.actors[slot])
        self.actors[slot] = self._spawn()

    def close(self) -> None:
        """Stop every actor (the cluster outlives the run; its actors should not)."""
        for actor in self.actors:
            self._ray.kill(actor)
