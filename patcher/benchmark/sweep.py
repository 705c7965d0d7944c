"""The measurement plan: every batch size x concurrency, models interleaved in short windows (ABBA) so drift cancels."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from patcher.base.errors import PatcherError
from patcher.benchmark import server_stats
from patcher.benchmark.context import RunContext
from patcher.benchmark.defaults import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_CONCURRENCY,
    DEFAULT_DURATION_S,
    DEFAULT_MAX_REQUESTS,
)
from patcher.benchmark.inprocess import Runner, measure, onnxruntime_runner, torch_runner
from patcher.benchmark.loadgen import Load, LoadResult, Payload, open_channel, run_load, warm_up
from patcher.benchmark.machine import cpu_seconds_group, cpu_seconds_self
from patcher.benchmark.results import Setting, result_row
from patcher.benchmark.shm import shared_input
from patcher.benchmark.targets import ServedTarget, input_batch, payload

WINDOW_S = 0.5  # target length of one interleaved measurement window
WINDOWS_PER_LATENCY = 5  # a window lasts at least this many request latencies (the drain after it is idle time)
Tick = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class Sweep:
    """The settings measured: every batch size x concurrency, duration_s and max_requests per model and setting,
    split into `rounds` interleaved windows."""

    concurrency: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    duration_s: float
    max_requests: int
    shared_memory: bool
    rounds: int
    adaptive: bool = True  # fewer, longer windows where requests are slow (see rounds_for)
    timeout_s: float = 60.0

    @property
    def round_duration_s(self) -> float:
        """Seconds per model per window."""
        return self.duration_s / self.rounds

    def rounds_for(self, latency_s: float) -> int:
        """Windows at a setting whose requests take about `latency_s`: each at least WINDOWS_PER_LATENCY latencies
        long (each window ends with a drain of about one latency), an even number, at least 2."""
        if not self.adaptive:
            return self.rounds
        longest = self.duration_s / max(WINDOW_S, WINDOWS_PER_LATENCY * latency_s)
        return max(2, min(self.rounds, 2 * int(longest // 2)))

    def windowed(self, rounds: int) -> Sweep:
        """This sweep with `rounds` windows per setting."""
        return replace(self, rounds=rounds)


@dataclass(frozen=True)
class SweepOptions:
    """The sweep as a user states it: batch sizes x concurrency, time and requests per model and setting, inputs in
    shared memory or inline, rounds (default: about WINDOW_S windows). `checked()` validates it."""

    concurrency: Sequence[int] = DEFAULT_CONCURRENCY
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
    duration_s: float = DEFAULT_DURATION_S
    max_requests: int = DEFAULT_MAX_REQUESTS
    shared_memory: bool = False
    rounds: int | None = None

    def checked(self) -> Sweep:
        """The sweep to run; PatcherError for a bad setting."""
        return make_sweep(list(self.concurrency), list(self.batch_sizes), self.duration_s, self.max_requests,
                          self.shared_memory, self.rounds)


def make_sweep(
    concurrency: list[int],
    batch_sizes: list[int],
    duration_s: float,
    max_requests: int,
    shared_memory: bool,
    rounds: int | None = None,
) -> Sweep:
    """A checked sweep (rounds default: windows of about WINDOW_S, an even number, at least 2); PatcherError if bad."""
    if not concurrency or not batch_sizes:
        raise PatcherError("give at least one concurrency and one batch size, e.g. --concurrency 1,4 --batch-sizes 1,8")
    if min(concurrency) < 1 or min(batch_sizes) < 1:
        raise PatcherError(f"concurrency {concurrency} and batch sizes {batch_sizes} must all be at least 1")
    if duration_s <= 0 or max_requests < 1 or (rounds is not None and rounds < 1):
        raise PatcherError("duration must be positive, max requests and rounds at least 1")
    adaptive = rounds is None
    if rounds is None:
        rounds = max(2, 2 * math.ceil(duration_s / WINDOW_S / 2))
    return Sweep(concurrency=tuple(dict.fromkeys(concurrency)), batch_sizes=tuple(dict.fromkeys(batch_sizes)),
                 duration_s=float(duration_s), max_requests=int(max_requests), shared_memory=shared_memory,
                 rounds=rounds, adaptive=adaptive)


def round_order(items: list[Any], round_index: int) -> list[Any]:
    """ABC in even rounds, CBA in odd ones (ABBA over two rounds: linear drift cancels between models)."""
    return list(items) if round_index % 2 == 0 else list(reversed(items))


@dataclass
class Budget:
    """Requests left for one model (or in-process runner) over its remaining windows: never more than the total."""

    left: int
    windows: int

    def next_window(self) -> int:
        """The most requests the next window may send (0: skip it), spreading what is left evenly."""
        share = math.ceil(self.left / self.windows) if self.windows > 0 else self.left
        self.windows -= 1
        return max(0, share)

    def spend(self, sent: int) -> None:
        """Record what a window sent."""
        self.left -= sent


@dataclass
class _Pooled:
    """One model's measurements at one setting, pooled over its windows."""

    load: LoadResult | None = None
    server: dict[str, Any] | None = None
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    last_sent: int = 0

    def add(self, load: LoadResult, server: dict[str, Any], client_cpu_s: float, server_cpu_s: float | None) -> None:
        self.last_sent = load.sent
        self.load = load if self.load is None else self.load.merge(load)
        self.server = server_stats.merge(self.server, server)
        self.client_cpu_s += client_cpu_s
        if server_cpu_s is not None:
            self.server_cpu_s = (self.server_cpu_s or 0.0) + server_cpu_s


@dataclass(frozen=True, kw_only=True)
class SweepServer:
    """The served side of a sweep: the server's address, client, process group and key headers, the models it
    serves, and what their rows are measured against (FLOPs per image of each kind, the matmul peak)."""

    url: str
    client: Any
    served: list[ServedTarget]
    flops: dict[str, int]
    peak: float | None
    pgid: int | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True)
class _Rig:
    """What every window of a sweep uses: the server, the sweep, the open channel, the progress callback."""

    server: SweepServer
    sweep: Sweep
    channel: Any
    tick: Tick


@dataclass
class _InProcess:
    """The in-process runners of one batch size, each one's budget over the batch, and what they measured."""

    runners: dict[tuple[str, str], Runner]
    budgets: dict[tuple[str, str], Budget]
    pooled: dict[tuple[str, str], LoadResult] = field(default_factory=dict)


def _window(rig: _Rig, request: Payload, concurrency: int, setting: Sweep, pooled: _Pooled, requests: int) -> None:
    """One measurement window, with Triton's statistics and the client's and server's CPU time around it."""
    client, pgid = rig.server.client, rig.server.pgid
    before = server_stats.snapshot(client, request.model)
    client_cpu = cpu_seconds_self()
    server_cpu = cpu_seconds_group(pgid) if pgid else None
    load = run_load(rig.server.url, request,
                    Load(concurrency=concurrency, duration_s=setting.round_duration_s, max_requests=requests),
                    timeout_s=setting.timeout_s, channel=rig.channel)
    client_cpu = cpu_seconds_self() - client_cpu
    if server_cpu is not None:
        after_cpu = cpu_seconds_group(pgid)  # type: ignore[arg-type]
        server_cpu = None if after_cpu is None else after_cpu - server_cpu
    after = server_stats.settled_snapshot(client, request.model, before, load.succeeded)
    pooled.add(load, server_stats.delta(before, after), client_cpu, server_cpu)


def _served_row(rig: _Rig, target: ServedTarget, batch: int, concurrency: int, setting: Sweep,
                pooled: _Pooled) -> dict[str, Any]:
    assert pooled.load is not None
    input_kind = "bytes" if target.takes_bytes else ("shm" if setting.shared_memory else "inline")
    measured = Setting(model=target.name, kind=target.kind, runtime="triton", input_kind=input_kind,
                       batch_size=batch, concurrency=concurrency)
    row = result_row(measured, pooled.load, pooled.server, rig.server.flops.get(target.kind), rig.server.peak)
    sent = pooled.load.sent
    row["windows"] = setting.rounds
    row["client_cpu_ms_per_request"] = round(1e3 * pooled.client_cpu_s / sent, 4) if sent else None
    if pooled.server_cpu_s is not None and sent:
        row["server_cpu_ms_per_request"] = round(1e3 * pooled.server_cpu_s / sent, 4)
    return row


def inprocess_runners(context: RunContext, threads: int) -> Callable[[int], dict[tuple[str, str], Runner]]:
    """batch -> {(runtime, kind): runner}: onnxruntime and PyTorch eager on the run's graphs at that batch size."""

    def at(batch: int) -> dict[tuple[str, str], Runner]:
        array = np.random.default_rng(0).standard_normal((batch, 3, *context.image_size)).astype(np.float32)
        runners: dict[tuple[str, str], Runner] = {}
        for kind in context.onnx:
            runners[("onnxruntime", kind)] = onnxruntime_runner(context.onnx[kind], array, threads)
            if kind in context.graphs:  # PyTorch has no int8 graph of the run
                runners[("torch", kind)] = torch_runner(context.graphs[kind], array)
        return runners

    return at


def run_sweep(
    server: SweepServer,
    sweep: Sweep,
    local: Callable[[int], dict[tuple[str, str], Runner]] | None = None,
    tick: Tick = lambda _: None,
) -> list[dict[str, Any]]:
    """Every (batch, concurrency) setting against every served model, and the in-process runners of each batch,
    all interleaved ABBA in short windows: a row per served model and setting, one per in-process runner and batch.

    The in-process runners (concurrency 1, back to back) share each setting's rotation with a 1/len(concurrency)
    share of its window, so that at every batch size they are measured over the same minutes as the server.
    """
    rows = []
    channel = open_channel(server.url)
    try:
        rig = _Rig(server, sweep, channel, tick)
        for batch in sweep.batch_sizes:
            rows += _sweep_batch(rig, batch, local)
    finally:
        channel.close()
    return sorted(rows, key=lambda r: (r["runtime"] != "triton", r["batch_size"] if r["runtime"] != "triton" else 0))


def _sweep_batch(rig: _Rig, batch: int, local: Callable[[int], dict[tuple[str, str], Runner]] | None
                 ) -> list[dict[str, Any]]:
    """One batch size at every concurrency (a row per served model and setting), then its in-process rows."""
    sweep, rows = rig.sweep, []
    runners = local(batch) if local else {}
    inprocess = _InProcess(runners, {key: Budget(sweep.max_requests, len(sweep.concurrency)) for key in runners})
    with ExitStack() as stack:
        payloads = {}
        for target in rig.server.served:
            region = None
            if sweep.shared_memory and not target.takes_bytes:
                region = stack.enter_context(shared_input(rig.server.client, input_batch(target, batch),
                                                          rig.server.headers))
            payloads[target.name] = payload(target, batch, region)
        for concurrency in sweep.concurrency:
            rows += _sweep_setting(rig, payloads, batch, concurrency, inprocess)
    for (runtime, kind), load in inprocess.pooled.items():
        measured = Setting(model=f"{kind} ({runtime})", kind=kind, runtime=runtime, input_kind="in-process",
                           batch_size=batch, concurrency=1)
        rows.append(result_row(measured, load, flops=rig.server.flops.get(kind), peak_gflops=rig.server.peak))
    del runners, inprocess
    return rows


def _warm(rig: _Rig, payloads: dict[str, Payload], concurrency: int) -> float:
    """Uncounted requests to every served model at this concurrency (new shapes make onnxruntime allocate); the
    longest mean latency they saw."""
    latency, client = 0.0, rig.server.client
    for target in rig.server.served:
        before = server_stats.snapshot(client, target.name)
        warm = warm_up(rig.server.url, payloads[target.name], concurrency, max(4, 2 * concurrency),
                       timeout_s=rig.sweep.timeout_s, channel=rig.channel)
        server_stats.settled_snapshot(client, target.name, before, warm.succeeded)  # not in a window
        latency = max(latency, float(warm.latencies_s.mean()) if warm.succeeded else 0.0)
    return latency


def _sweep_setting(rig: _Rig, payloads: dict[str, Payload], batch: int, concurrency: int,
                   inprocess: _InProcess) -> list[dict[str, Any]]:
    """One (batch, concurrency) setting: served models and in-process runners interleaved ABBA in windows."""
    sweep, served = rig.sweep, rig.server.served
    setting = sweep.windowed(sweep.rounds_for(_warm(rig, payloads, concurrency)))
    local_window = setting.round_duration_s / len(sweep.concurrency)
    pooled = {target.name: _Pooled() for target in served}
    budgets = {target.name: Budget(sweep.max_requests, setting.rounds) for target in served}
    # in-process runners: one budget per batch, a share of it at each concurrency setting
    local_budgets = {key: Budget(inprocess.budgets[key].next_window(), setting.rounds) for key in inprocess.runners}
    rotation: list[Any] = [*served, *inprocess.runners]
    for round_index in range(setting.rounds):
        for item in round_order(rotation, round_index):
            budget = budgets[item.name] if isinstance(item, ServedTarget) else local_budgets[item]
            requests = budget.next_window()
            if requests < 1:
                continue
            if isinstance(item, ServedTarget):
                rig.tick(f"{item.name} b{batch} c{concurrency} window {round_index + 1}/{setting.rounds}")
                _window(rig, payloads[item.name], concurrency, setting, pooled[item.name], requests)
                budget.spend(pooled[item.name].last_sent)
                continue
            rig.tick(f"{item[0]} {item[1]} b{batch} window {round_index + 1}/{setting.rounds}")
            load = measure(inprocess.runners[item], local_window, requests,
                           warmup_calls=0 if item in inprocess.pooled else 1)
            budget.spend(load.sent)
            inprocess.budgets[item].spend(load.sent)
            inprocess.pooled[item] = inprocess.pooled[item].merge(load) if item in inprocess.pooled else load
    for _ in range((sweep.rounds - setting.rounds) * len(rotation)):
        rig.tick(f"b{batch} c{concurrency}: {setting.rounds} longer windows")
    return [_served_row(rig, target, batch, concurrency, setting, pooled[target.name]) for target in served]
