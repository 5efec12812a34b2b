"""The Ray executor: one grid across the GPUs of one machine or of a cluster, one Ray task per cell.

    bench run ... --executor ray [--ray-address ADDR] [--gpus-per-run F] [--cpus-per-run N]

Each job (a cell, or a dataset's real-data row) is one Ray task with `--cpus-per-run` CPUs (its torch threads)
and `--gpus-per-run` GPUs (Ray sets CUDA_VISIBLE_DEVICES; a fraction shares a GPU). Without an address a local
Ray instance is started (with every core of this machine) and shut down at the end; with one, the driver joins
that cluster (`ray start --head` / `ray start --address` on each node first).

What stays as with the local executor: the keys, the run folders, the checkpoints and the per-cell locks
(bench.grid.runner.Runner.cell_lock: fcntl.flock on the shared results folder), so a cell interrupted on any worker
resumes from its checkpoint on any other, with its privacy ledger restored from that checkpoint: no step is
charged twice.

What differs:
- Only the driver writes the SQLite index (SQLite over a network file system is not safe to share): a worker's
  Store (`SendingStore`) writes the run folder and sends each index write to the driver through a mailbox actor,
  in order; the driver applies them as they arrive, so `bench report` during a grid sees the cells running.
- Before any task, a probe task on every node checks that it sees the results folder (a file the driver wrote,
  by content: the same path on a node's local disk is not enough), can write there, is refused a lock the driver
  holds there (fcntl.flock must exclude across nodes, which some network file systems do not do: the per-cell
  locks would then let two workers run one cell), runs the same bench code (the harness hash), and sees the
  plugin files and --data-root; a node that does not is named in the error.
- A job whose worker dies (killed, out of memory, node lost) is recorded as failed with Ray's reason, in the
  index and the run's log.txt; the grid goes on. Tasks are not retried (max_retries = 0): rerunning the
  command resumes that cell from its last checkpoint.
- The driver shows the grid's bar and one bar per running job, labelled with its host, pid and GPU.

Ray is an optional dependency (`pip install 'bench-dp-gen[ray]'`, part of the dev extra); without it
`--executor ray` fails with that install line.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench.allocator import keep_freed_memory
from bench.contract import ImageDataset
from bench.errors import BenchError, one_line
from bench.grid import registry
from bench.grid.executors.base import wait_for_busy
from bench.grid.planning import Job, RunSpec, spec_from_json
from bench.grid.runner import Runner, resolve_device, take_lock
from bench.grid.store import Store

INSTALL = "pip install 'bench-dp-gen[ray]'"
_INDEX_OPS = ("record_run", "record_metrics", "record_curve", "clear_index", "reindex")
_ADVANCE_EVERY_S = 0.5  # a worker sends its bar's progress at most this often


def require_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise BenchError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


# ---------------------------------------------------------------------------------------------------
# The worker side
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to build the driver's Runner (paths absolute, as every node must see them)."""

    root: str
    device: str  # auto | cpu | cuda, resolved on the worker
    threads: int
    data_root: str | None
    download: bool
    plugins: tuple[str, ...]
    force: bool
    force_since: float | None  # the driver's: a shared stage is retrained once per grid, not once per worker
    checkpoint_every_s: float
    metrics: tuple[str, ...] | None
    inception_weights: str | None
    debug: bool

    @classmethod
    def of(cls, runner: Runner, device: str, threads: int) -> WorkerSettings:
        def absolute(path: str | None) -> str | None:
            return None if path is None else str(Path(path).resolve())

        return cls(
            root=str(runner.store.root.resolve()),
            device=device,
            threads=threads,
            data_root=absolute(runner.data_root),
            download=runner.download,
            plugins=tuple(str(absolute(p)) for p in runner.plugins),
            force=runner.force,
            force_since=runner.force_since,
            checkpoint_every_s=runner.checkpoint_every_s,
            metrics=runner.metrics,
            inception_weights=absolute(runner.inception_weights),
            debug=runner.debug,
        )


class SendingStore(Store):
    """A worker's view of the results folder: the run folders as usual, the index writes sent to the driver."""

    def __init__(self, root: str | Path, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(root, index=False)
        self._send = send

    def record_run(self, key: str, **fields: Any) -> None:
        self._send(("index", key, "record_run", fields))

    def record_metrics(self, key: str, metrics: dict[str, dict[str, Any]]) -> None:
        self._send(("index", key, "record_metrics", {"metrics": metrics}))

    def record_curve(self, key: str, points: list[dict[str, Any]]) -> None:
        self._send(("index", key, "record_curve", {"points": points}))

    def clear_index(self, key: str) -> None:
        self._send(("index", key, "clear_index", {}))

    def status(self, key: str) -> str | None:
        return None  # a worker does not read the index: a finished cell asks the driver to set it from the folder

    def reindex(self, key: str) -> None:
        self._send(("index", key, "reindex", {}))

    def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        raise RuntimeError("a worker does not read the index")


class SendingUI:
    """A worker's progress bar: its start and (at most every 0.5 s) its progress, sent to the driver."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send, self._pending, self._last, self._key = send, 0, 0.0, ""

    def run_callbacks(self, job: Any) -> tuple[Callable[[int, str], None], Callable[[int], None]]:
        self._key = job.key

        def start(total: int, description: str) -> None:
            self.flush()
            self._send(("bar", self._key, total, description))

        def advance(n: int) -> None:
            self._pending += n
            if time.monotonic() - self._last >= _ADVANCE_EVERY_S:
                self.flush()

        return start, advance

    def flush(self) -> None:
        if self._pending:
            self._send(("advance", self._key, self._pending))
        self._pending, self._last = 0, time.monotonic()


_datasets: dict[tuple[str | None, bool], dict[tuple[str, str], ImageDataset]] = {}  # a worker's loaded data


def to_payload(job: Job) -> Job | dict[str, Any]:
    """What a task is sent: a cell as its JSON (RunSpec.to_json), a real-data row as it is. The config crosses the
    process boundary as JSON and is checked again on the worker (a plugin's Config class, loaded from a file, cannot
    be unpickled on a worker that has not loaded the plugin yet)."""
    return job.to_json() if isinstance(job, RunSpec) else job


def run_job(
    settings: WorkerSettings, payload: Job | dict[str, Any], wait: bool, mailbox: Any
) -> tuple[str, str | None]:
    """A Ray task: run one job with a Runner like the driver's; returns (outcome, one-line error or None)."""
    ray = require_ray()
    job = spec_from_json(payload, settings.plugins) if isinstance(payload, dict) else payload

    def send(item: tuple[Any, ...]) -> None:
        # Not waited for: a task blocked in ray.get lends its CPUs back to Ray, which would start another cell on
        # them. One caller's calls to an actor run in the order they were made, and the last one is "end".
        mailbox.put.remote(item)

    torch.set_num_threads(settings.threads)
    keep_freed_memory()  # as in the driver (bench.allocator)
    gpus = ray.get_gpu_ids()
    device = resolve_device("cpu" if settings.device == "auto" and not gpus else settings.device)
    where = f"{socket.gethostname()} pid {os.getpid()}" + (f" gpu {','.join(map(str, gpus))}" if gpus else "")
    send(("start", job.key, where))
    runner = Runner(
        SendingStore(settings.root, send),
        device=device,
        data_root=settings.data_root,
        download=settings.download,
        plugins=settings.plugins,
        force=settings.force,
        force_since=settings.force_since,
        checkpoint_every_s=settings.checkpoint_every_s,
        metrics=settings.metrics,
        inception_weights=settings.inception_weights,
        debug=settings.debug,
        datasets=_datasets.setdefault((settings.data_root, settings.download), {}),  # kept for the next task
    )
    ui = SendingUI(send)
    try:
        outcome = runner.run(job, ui=ui, wait=wait)
    finally:
        ui.flush()
        send(("end", job.key))
    return outcome, runner.errors.get(job.key)


def probe_node(root: str, probe: str, token: str, plugins: tuple[str, ...], data_root: str | None) -> dict[str, Any]:
    """A Ray task pinned to one node: what that node cannot see or do of what the grid needs. The driver holds
    an exclusive flock on locks/<probe>.lock meanwhile: this node must be refused it."""
    problems = []
    try:
        seen = (Path(root) / probe).read_text()
    except OSError as e:
        seen = f"({e.strerror or e})"
    if seen != token:
        problems.append(f"does not see the results folder {root} (the driver's probe file: {seen[:80]!r})")
    else:
        try:
            Store(root, index=False)
        except BenchError as e:
            problems.append(str(e))
        if problem := lock_problem(Path(root) / "locks" / f"{probe}.lock"):
            problems.append(problem)
    problems += [f"does not see the plugin file {p}" for p in plugins if not Path(p).is_file()]
    if data_root is not None and not Path(data_root).is_dir():
        problems.append(f"does not see --data-root {data_root}")
    return {"host": socket.gethostname(), "harness": registry.harness_hash(), "problems": problems}


def lock_problem(path: Path) -> str | None:
    """None when this process is refused the exclusive flock on `path` (held by the driver), else what is wrong."""
    try:
        with open(path, "a+") as f:
            if not take_lock(f):
                return None
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError as e:
        return f"cannot take a lock in the results folder ({e.strerror or e}): the cell locks need fcntl.flock there"
    return (
        "takes a lock the driver holds in the results folder: fcntl.flock on this file system does not exclude "
        "across nodes, so two workers could run one cell; use a file system whose locks are cluster-wide"
    )


# ---------------------------------------------------------------------------------------------------
# The driver side
# ---------------------------------------------------------------------------------------------------


class _Mailbox:
    """The actor the workers send their messages to; the driver takes them in the order they were sent."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, ...]] = []

    def put(self, item: tuple[Any, ...]) -> None:
        self.items.append(item)

    def take(self) -> list[tuple[Any, ...]]:
        items, self.items = self.items, []
        return items


class RayExecutor:
    """Runs each job as a Ray task (see the module docstring). Use as a context manager: the connection (or the
    local instance) lives until exit."""

    def __init__(
        self, *, address: str | None = None, gpus_per_run: float | None = None, cpus_per_run: int = 1,
        device: str = "auto",
    ) -> None:  # fmt: skip
        self.address, self.gpus_per_run, self.cpus_per_run, self.device = address, gpus_per_run, cpus_per_run, device
        self._ray: ModuleType | None = None
        self._started = False  # whether this executor connected (and so disconnects)
        self._checked: set[str] = set()  # results folders checked on every node

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ray is not None and self._started:
            self._ray.shutdown()
        self._ray, self._started = None, False

    def _connect(self) -> ModuleType:
        if self._ray is not None:
            return self._ray
        ray = require_ray()
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                    configure_logging=True,
                )  # fmt: skip
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise BenchError(f"cannot connect to {where}: {one_line(e)}") from None
            self._started = True
        self._ray = ray
        return ray

    def _nodes(self) -> list[dict[str, Any]]:
        assert self._ray is not None
        return [n for n in self._ray.nodes() if n.get("Alive")]

    def gpus(self) -> float:
        """--gpus-per-run, or by default 1 when the cluster has GPUs and --device is not cpu, else 0."""
        if self.gpus_per_run is not None:
            return self.gpus_per_run
        has_gpus = any(n["Resources"].get("GPU", 0) >= 1 for n in self._nodes())
        if self.device == "cuda" and not has_gpus:
            raise BenchError("--device cuda: no node of the Ray cluster has a GPU")
        return 1.0 if has_gpus and self.device != "cpu" else 0.0

    def check(self, settings: WorkerSettings, gpus: float) -> None:
        """Every node can run the grid: enough resources on some node, and each one sees the results folder, the
        plugin files and --data-root, and runs this bench (probe_node). One line naming each node that cannot."""
        ray = self._connect()
        nodes = self._nodes()
        for need, resource, option in ((settings.threads, "CPU", "--cpus-per-run"), (gpus, "GPU", "--gpus-per-run")):
            if need > (most := max((n["Resources"].get(resource, 0.0) for n in nodes), default=0.0)):
                raise BenchError(f"{option} {need:g}: the Ray cluster's largest node has {most:g} {resource}s")
        if settings.root in self._checked:
            return
        token = uuid.uuid4().hex
        probe = f".probe-{token}"
        probe_path = Path(settings.root) / probe
        probe_path.write_text(token)
        lock_path = Path(settings.root) / "locks" / f"{probe}.lock"
        lock_path.parent.mkdir(exist_ok=True)
        task = ray.remote(num_cpus=0, max_retries=0)(probe_node)
        with open(lock_path, "a+") as held:
            if not take_lock(held):  # a fresh file: no one else can hold it
                raise RuntimeError(f"the probe's lock {lock_path} is held by another process")
            try:
                failures = self._probe(ray, task, nodes, settings, probe, token)
            finally:
                probe_path.unlink(missing_ok=True)
                lock_path.unlink(missing_ok=True)
        if failures:
            raise BenchError("; ".join(failures) + "; every node must see the same folders (a shared file system)")
        self._checked.add(settings.root)

    def _probe(
        self, ray: ModuleType, task: Any, nodes: list[dict[str, Any]], settings: WorkerSettings, probe: str, token: str
    ) -> list[str]:
        """Run probe_node on every node; one line a problem."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = {
            n["NodeManagerAddress"]: task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
            ).remote(settings.root, probe, token, settings.plugins, settings.data_root)
            for n in nodes
        }
        failures = []
        for address, ref in refs.items():
            try:
                seen = ray.get(ref, timeout=300)
            except Exception as e:  # noqa: BLE001 - any failure of the probe is that node's problem
                failures.append(f"node {address}: cannot run bench ({one_line(e)}); install the same bench there")
                continue
            problems = list(seen["problems"])
            if seen["harness"] != registry.harness_hash():
                problems.append(
                    f"runs other bench code (harness {seen['harness']}, here {registry.harness_hash()}); "
                    "install the same version on every node"
                )
            failures += [f"node {seen['host']} ({address}) {p}" for p in problems]
        return failures

    def run(self, runner: Runner, jobs: list[Job], ui: Any, echo: Callable[[str], None]) -> list[str]:
        if not jobs:
            return []
        ray = self._connect()
        gpus = self.gpus()
        settings = WorkerSettings.of(runner, self.device, self.cpus_per_run)
        self.check(settings, gpus)
        task = ray.remote(run_job).options(num_cpus=self.cpus_per_run, num_gpus=gpus, max_retries=0)
        mailbox = ray.remote(num_cpus=0)(_Mailbox).remote()

        def one_pass(batch: list[Job], wait: bool) -> list[str]:
            return _Pass(ray, mailbox, runner, ui, batch).run(task, settings, wait)

        try:
            return wait_for_busy(runner, jobs, one_pass, echo)
        finally:
            ray.kill(mailbox)


_END_WAIT_S = 60.0  # how long the driver waits for the last messages of a task that has returned


class _Pass:
    """One pass of the driver over a batch of jobs: submit each as a task, apply the workers' messages as they
    arrive (index writes, progress), and turn each finished task into its outcome."""

    def __init__(self, ray: ModuleType, mailbox: Any, runner: Runner, ui: Any, batch: list[Job]) -> None:
        self.ray, self.mailbox, self.runner, self.ui, self.batch = ray, mailbox, runner, ui, batch
        self.by_key = {job.key: job for job in batch}
        self.bars: dict[str, tuple[Callable[[int, str], None], Callable[[int], None]]] = {}
        self.ended: set[str] = set()  # jobs whose worker sent its last message
        self.closed: set[str] = set()  # jobs recorded as lost: a late message from their worker is dropped

    def run(self, task: Any, settings: WorkerSettings, wait: bool) -> list[str]:
        ray = self.ray
        pending = {task.remote(settings, to_payload(job), wait, self.mailbox): i for i, job in enumerate(self.batch)}
        outcomes = [""] * len(self.batch)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
                self.drain()
                for ref in ready:
                    i = pending.pop(ref)
                    job = self.batch[i]
                    outcomes[i] = self.outcome(ref, job)
                    if outcomes[i] != "busy":
                        self.ui.grid_advance(job, outcomes[i], self.runner.errors.get(job.key))
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref)  # a KeyboardInterrupt in the task: its cell records "interrupted"
            ray.wait(list(pending), num_returns=len(pending), timeout=10)
            time.sleep(0.5)
            self.drain(index_only=True)
            raise
        return outcomes

    def drain(self, index_only: bool = False) -> None:
        for item in self.ray.get(self.mailbox.take.remote()):
            kind, key, *rest = item
            if key in self.closed:
                continue
            if kind == "index":
                op, kwargs = rest
                if op not in _INDEX_OPS:
                    raise RuntimeError(f"unknown index operation from a worker: {op!r}")
                getattr(self.runner.store, op)(key, **kwargs)
            elif kind == "end":
                self.ended.add(key)
            elif index_only:
                continue
            elif kind == "start":
                self.ui.started(self.by_key[key], rest[0])
            elif kind == "bar":
                self.bars[key] = self.ui.run_callbacks(self.by_key[key])
                self.bars[key][0](*rest)
            elif kind == "advance" and key in self.bars:
                self.bars[key][1](rest[0])

    def outcome(self, ref: Any, job: Job) -> str:
        """A finished task's outcome, once its last message is in. A task that raised outside the cell's guard
        (its worker could not load the data or the device) or whose worker was lost is recorded as failed here."""
        ray, runner = self.ray, self.runner
        raised: str | None = None  # the error of a task that raised or was lost: not recorded by its worker
        lost = False
        try:
            outcome, error = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
            outcome, error = "failed", one_line(cause)
            raised = error
        except ray.exceptions.RayError as e:
            outcome, error = "failed", f"worker lost: {one_line(e)}"
            raised, lost = error, True
        deadline = time.monotonic() + (1.0 if lost else _END_WAIT_S)
        while job.key not in self.ended and time.monotonic() < deadline:
            time.sleep(0.05)
            self.drain()
        if error is not None:
            runner.errors[job.key] = error
        if raised is not None:
            self.closed.add(job.key)
            runner.record_failure(job, raised)
        return str(outcome)
