"""Run the tritonserver bundled in nvidia-pytriton on a model repository, as a context manager.

Explicit model control, 127.0.0.1 and free ports by default, and a closed control plane: loading, unloading,
shared memory, trace and log settings need the server's key (`access.ServerKey`), which this object holds.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from patcher.base.errors import PatcherError
from patcher.base.scratch import Scratch, make_scratch
from patcher.triton.imaging import BUDGET_ENV
from patcher.triton.repository.entry import check_repository_path
from patcher.triton.repository.integrity import check_integrity
from patcher.triton.repository.stores import Store, is_object_store, open_store
from patcher.triton.serving import logs
from patcher.triton.serving.access import ServerKey, new_key
from patcher.triton.serving.install import (
    INSTALL_HINT,
    TritonInstall,
    ensure_open_files,
    find_tritonserver,
    prepare_backends,
    server_environment,
)
from patcher.triton.serving.ports import distinct_free_ports, port_in_use
from patcher.triton.serving.processes import die_with_parent, group_pids

SHM_DIR = Path("/dev/shm")
DEFAULT_SHM_BYTES = 4 << 20
SHM_GROWTH_BYTES = 1 << 20
UNLOAD_STALL_S = 2.0  # a stop stops waiting for unloads when no model has gone for this long (SIGTERM does the rest)
WORKDIR_PREFIX = "patcher-triton-"
STARTUP_STOP_S = 2.0
# gRPC request states kept for reuse keep the capacity of the largest request they held (64 MB of images, each):
# none are kept, so that the memory of a burst of large requests goes back
GRPC_STATE_POOL = 0


def exit_reason(code: int | None) -> str:
    """How a process ended, in words: "signal 6: SIGABRT", "code 1"."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {-code}: {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"code {code}"


class ServerDied(PatcherError):
    """tritonserver exited while starting (a crash, not a model that failed to load): worth another try."""


def repository_models(repo: Path | str | Store) -> list[str]:
    """Names of the models in a repository (folders holding a config.pbtxt), local or in an object store."""
    return open_store(repo).models()


@dataclass(frozen=True, kw_only=True)
class ServerPorts:
    """Where tritonserver listens: `host` (metrics, and gRPC and HTTP unless `private_host` keeps those elsewhere, as
    127.0.0.1 behind `patcher serve`'s fronts) and its three ports (None: a free one)."""

    host: str = "127.0.0.1"
    private_host: str | None = None
    http: int | None = None
    grpc: int | None = None
    metrics: int | None = None


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How tritonserver runs: its log file (default: one in its scratch folder, kept after a failure), the start-up
    and stop timeouts, the python backend's default shared-memory size, and its log verbosity."""

    log_path: Path | None = None
    startup_timeout_s: float = 60
    stop_timeout_s: float = 15
    shm_default_bytes: int = DEFAULT_SHM_BYTES
    log_verbose: int = 0


class TritonServer:
    """A tritonserver process on a model repository: explicit model control, restricted control plane."""

    def __init__(self, repo: Path | str, models: list[str] | None = None, ports: ServerPorts | None = None,
                 settings: ServerSettings | None = None, key: ServerKey | None = None) -> None:
        ports, settings = ports or ServerPorts(), settings or ServerSettings()
        self.store = open_store(repo)
        self.repo: Path | str = self.store.location if is_object_store(repo) else Path(repo).resolve()
        self.models = models
        self.host = ports.host
        self.private_host = ports.private_host or ports.host
        self.ports = {"http": ports.http, "grpc": ports.grpc, "metrics": ports.metrics}
        log_path = settings.log_path
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = settings.startup_timeout_s
        self.stop_timeout_s = settings.stop_timeout_s
        self.shm_default_bytes = settings.shm_default_bytes
        self.log_verbose = settings.log_verbose
        self.key = key or new_key()
        self.shm_prefix = f"patcher_triton_{uuid.uuid4().hex[:12]}_"
        self.process: subprocess.Popen[bytes] | None = None
        self.timings: dict[str, float] = {}  # start_s, stop_s of the last start and stop
        self.stray_pids: list[int] = []  # processes of the server's group still alive after stop()
        self.shm_leftovers: list[Path] = []  # segments stop() had to remove itself (only after a hard kill)
        self._workdir: Scratch | None = None
        self._log_handle: Any = None
        self._kept_log: Path | None = None  # where the log goes when stop() keeps it (it explains a failure)
        self._own_log = log_path is None
        self._loaded: list[str] = []
        self.restarts = 0

    # Endpoints ------------------------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint (what tritonclient.grpc takes)."""
        return f"{self.private_host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        """http://host:port of the HTTP/REST endpoint."""
        return f"http://{self.private_host}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        """http://host:port/metrics of the Prometheus endpoint."""
        return f"http://{self.host}:{self.ports['metrics']}/metrics"

    @property
    def loaded(self) -> list[str]:
        """The models this server was asked to serve (started with or loaded since)."""
        return list(self._loaded)

    @property
    def pgid(self) -> int | None:
        """The server's process group (its python stubs included), None when not running."""
        return self.process.pid if self.process is not None else None

    def http_client(self, timeout_s: float = 5.0) -> Any:
        """A tritonclient HTTP client of this server (restricted calls need `headers=self.key.http_headers`)."""
        import tritonclient.http as httpclient

        url = f"{self.private_host}:{self.ports['http']}"
        return httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)

    def grpc_client(self) -> Any:
        """A tritonclient gRPC client of this server (restricted calls need `headers=self.key.grpc_headers`)."""
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.grpc_url)

    # Lifecycle ------------------------------------------------------------------------------------------
    def _command(self, install: TritonInstall, backends: Path, models: list[str]) -> list[str]:
        return [
            str(install.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--cache-directory={install.caches}",
            "--model-control-mode=explicit",
            *[f"--load-model={model}" for model in models],
            f"--http-address={self.private_host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.private_host}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            f"--grpc-infer-allocation-pool-size={GRPC_STATE_POOL}",
            f"--backend-config=python,shm-default-byte-size={self.shm_default_bytes}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout_s) - 5)}",
            *self.key.server_flags(),
        ]

    def _check_start(self) -> list[str]:
        if self.process is not None:
            raise PatcherError("this TritonServer is already started")
        if not is_object_store(self.repo):
            check_repository_path(Path(self.repo))
        ensure_open_files()
        known = self.store.models()
        models = self.models if self.models is not None else known
        missing = [m for m in models if m not in known]
        if missing:
            raise PatcherError(f"{self.repo} has no model {', '.join(missing)} (it has: {known})")
        check_integrity(self.store, models)
        unset = [kind for kind, port in self.ports.items() if port is None]
        self.ports.update(zip(unset, distinct_free_ports(len(unset), self.host), strict=True))
        for kind, port in self.ports.items():
            host = self.host if kind == "metrics" else self.private_host
            if port_in_use(host, int(port)):  # type: ignore[arg-type]
                raise PatcherError(f"{kind} port {host}:{port} is in use (another server?): choose another port")
        return models

    def start(self) -> TritonServer:
        """Start tritonserver and wait until it and every requested model are ready."""
        models = self._check_start()
        install = find_tritonserver()
        self._workdir = make_scratch(WORKDIR_PREFIX)
        workdir = self._workdir.path
        try:
            check_repository_path(workdir, "temporary folder (TMPDIR)")
            backends = prepare_backends(install, workdir)
            if self._own_log:
                self.log_path = workdir / "tritonserver.log"
            assert self.log_path is not None
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        except BaseException:
            self._release_workdir()
            raise
        environment = {**server_environment(install), BUDGET_ENV: str(workdir / "decode.budget")}
        started = time.perf_counter()
        try:
            self.process = subprocess.Popen(
                self._command(install, backends, models),
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                start_new_session=True,  # own process group: one signal stops the server and its python stubs
                # the server dies with us only if started from the main thread (PDEATHSIG follows the thread)
                preexec_fn=die_with_parent if threading.current_thread() is threading.main_thread() else None,
            )
        except OSError as error:
            self._release_workdir()
            raise PatcherError(f"cannot run {install.binary} ({error.strerror}): {INSTALL_HINT}") from None
        atexit.register(self.stop)
        self._loaded = list(models)
        self._kept_log = None
        try:
            self.wait_ready(models)
        except BaseException:
            self.stop(STARTUP_STOP_S)  # nothing is served yet: no need to wait for models to finish loading
            raise
        self.timings["start_s"] = time.perf_counter() - started
        return self

    def restart(self) -> TritonServer:
        """Start a server that died again: the same ports, key and models (those loaded since included)."""
        self.stop()
        self.models = list(self._loaded)
        self.restarts += 1
        return self.start()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def running(self) -> bool:
        """True while the tritonserver process is alive."""
        return self.process is not None and self.process.poll() is None

    def _unload_all(self, timeout_s: float) -> None:
        """Unload every live model and wait until they are gone: tritonserver checks its live models once a second as
        it exits, so a stop that leaves the unloading to it takes 2-3 s, where this takes the slowest unload (an
        unload lets in-flight requests finish, as the exit does)."""
        from tritonclient.utils import InferenceServerException

        live = [name for name, state in self._live_states().items() if state.get("state") in ("READY", "LOADING")]
        if not live:
            return
        deadline = time.monotonic() + timeout_s
        client = self.http_client(timeout_s=timeout_s)
        try:
            for name in live:  # an unload call returns at once; the model goes when its requests are done
                client.unload_model(name, headers=self.key.http_headers)
        except (InferenceServerException, OSError, ConnectionError):
            return  # the SIGTERM that follows unloads what is left
        finally:
            client.close()
        # a model whose stub has died can take the exit's whole timeout to unload: wait only while models still go
        left, progress = len(live), time.monotonic()
        while (now := time.monotonic()) < deadline and now - progress < UNLOAD_STALL_S:
            going = sum(state.get("state") in ("READY", "UNLOADING") for state in self._live_states().values())
            if going == 0:
                return
            if going < left:
                left, progress = going, now
            time.sleep(0.05)

    def _terminate(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        pgid = process.pid
        if process.poll() is None:
            self._unload_all(min(timeout_s, 10.0))
            try:
                os.killpg(pgid, signal.SIGTERM)
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                process.wait(timeout=10)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while group_pids(pgid) and time.monotonic() < deadline:  # python stubs exit after the server
            time.sleep(0.05)
        if group_pids(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.5)
        self.stray_pids = group_pids(pgid)

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM the server (its stubs follow), SIGKILL the group if it does not exit within `timeout_s` (default
        stop_timeout_s); release shm and the work folder."""
        atexit.unregister(self.stop)
        process, self.process = self.process, None
        if process is None:
            self._release_workdir()
            return
        started = time.perf_counter()
        self._terminate(process, self.stop_timeout_s if timeout_s is None else timeout_s)
        self.shm_leftovers = self.shm_segments()
        for segment in self.shm_leftovers:  # only after a hard kill: the server removes its own on SIGTERM
            segment.unlink(missing_ok=True)
        self._release_workdir()
        self.timings["stop_s"] = time.perf_counter() - started

    def _release_workdir(self) -> None:
        """Close the log (moving it to the kept logs if it explains a failure) and remove the work folder."""
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._workdir is None:
            return
        if self._own_log and self.log_path is not None:
            if self._kept_log is not None and self.log_path.is_file():
                self.log_path = logs.keep(self.log_path, self._kept_log)
            else:
                self.log_path = None
        self._workdir.remove()
        self._workdir = None

    def shm_segments(self) -> list[Path]:
        """This server's python-backend shared-memory segments in /dev/shm (none once it has stopped)."""
        if not SHM_DIR.is_dir():
            return []
        return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(self.shm_prefix))

    # Log ------------------------------------------------------------------------------------------------
    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log."""
        return logs.tail(self.log_path, lines)

    def last_error_line(self, model: str | None = None) -> str:
        """The server log's last error line (about `model` if one mentions it)."""
        return logs.last_error_line(self.log_path, model)

    def failure(self, what: str, model: str | None = None, errors_only: bool = False) -> PatcherError:
        """A PatcherError for `what`, naming the log (where it stays after stop) and its last relevant error line
        (with `errors_only`, none when the log holds no error)."""
        line = logs.last_error_line(self.log_path, model, errors_only)
        if self._own_log and self._workdir is not None and self._kept_log is None:
            self._kept_log = logs.kept_log_path(self.pgid or 0)
        shown = self._kept_log or self.log_path
        return PatcherError(f"{what} (log {shown}): {line}" if line else f"{what} (log {shown})")

    def trim_log(self, max_bytes: int = logs.LOG_MAX_BYTES) -> bool:
        """Keep the log below about `max_bytes` (logs.trim); True if it was cut."""
        return self._log_handle is not None and self.log_path is not None and logs.trim(self.log_path, max_bytes)

    # Readiness and model control ------------------------------------------------------------------------
    def model_states(self) -> dict[str, dict[str, str]]:
        """Every model the repository index lists: {name: {"state", "version", "reason"}} (a restricted API)."""
        client = self.http_client()
        try:
            index = client.get_model_repository_index(headers=self.key.http_headers)
        finally:
            client.close()
        return {entry["name"]: entry for entry in index}

    def _live_states(self) -> dict[str, dict[str, str]]:
        from tritonclient.utils import InferenceServerException

        try:
            client = self.http_client(timeout_s=2.0)
            try:
                live = client.is_server_live()
            finally:
                client.close()
            return self.model_states() if live else {}
        except (InferenceServerException, OSError, ConnectionError):
            return {}

    def wait_ready(self, models: list[str] | None = None, timeout_s: float | None = None) -> None:
        """Block until the server is live and `models` (default: those started with) are READY."""
        models = self._loaded if models is None else models
        limit = timeout_s or self.startup_timeout_s
        deadline = time.monotonic() + limit
        while True:
            if not self.running():
                code = None if self.process is None else self.process.returncode
                raise ServerDied(str(self.failure(f"tritonserver exited during startup ({exit_reason(code)})")))
            states = self._live_states()
            failed = [m for m in models if states.get(m, {}).get("state") == "UNAVAILABLE"]
            if failed:
                reason = states[failed[0]].get("reason", "")
                raise self.failure(f"model {failed[0]} failed to load: {reason}".rstrip(": "), failed[0])
            if states and all(states.get(m, {}).get("state") == "READY" for m in models):
                return
            if time.monotonic() > deadline:
                raise self.failure(f"tritonserver not ready after {limit:.0f} s")
            self.trim_log()
            time.sleep(0.1)

    def load_model(self, name: str, config: str | None = None) -> None:
        """Load (or reload, picking up new versions and configs) a model; `config` (JSON) overrides config.pbtxt."""
        from tritonclient.utils import InferenceServerException

        if not self.running():
            raise PatcherError("tritonserver is not running: start it first")
        if config is None:
            check_integrity(self.store, [name])
        client = self.grpc_client()
        try:
            client.load_model(name, config=config, headers=self.key.grpc_headers)
        except InferenceServerException as error:
            raise self.failure(f"model {name} failed to load: {error.message()}", name) from None
        finally:
            client.close()
        if name not in self._loaded:
            self._loaded.append(name)

    def load_models(self, names: list[str] | None = None) -> None:
        """Load or reload several models (default: every model this server has loaded), e.g. after a new version."""
        for name in list(self._loaded) if names is None else names:
            self.load_model(name)

    def unload_model(self, name: str, forget: bool = True) -> None:
        """Unload a model (`forget=False`: it stays among the models this server is to serve)."""
        client = self.grpc_client()
        try:
            client.unload_model(name, headers=self.key.grpc_headers)
        finally:
            client.close()
        if forget and name in self._loaded:
            self._loaded.remove(name)

