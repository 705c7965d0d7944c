"""What `patcher serve` does while it serves: roll out committed repository updates, and heal dead backends.

Each `tick()`, under the repository's publish lock (so no half-published update is ever read):
- rollout: when the journal's serial moved, every served model whose files changed on disk is loaded again,
  composing models before ensembles; `version_policy latest 1` makes Triton answer with the old version
  until the new one is ready;
- healing: a python-backend model with fewer live stub processes than instances, or with new failed requests,
  gets a probe request; if the probe says its stub is not healthy the model is unloaded (so readiness says so)
  and loaded again, and the ensembles that use it are loaded again if they went with it. Loading reads the
  repository (an ensemble's load reloads its composing models from disk too), so while the repository is
  half-published a dead model is only unloaded, and loaded once `patcher triton` has completed the update.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from patcher.base.errors import PatcherError
from patcher.triton.repository.configs import CONFIG_FILE
from patcher.triton.serving.health import Suspects, backend_died, probe
from patcher.triton.serving.server import TritonServer

Echo = Callable[[str], None]


class Supervisor:
    """Rollout and healing for one running server; call `tick()` every second or so."""

    def __init__(self, server: TritonServer, serve_all: bool, echo: Echo) -> None:
        self.server = server
        self.serve_all = serve_all
        self.echo = echo
        self.store = server.store
        self.serial = self.store.journal().serial
        self.signatures = {model: self.store.signature(model) for model in server.loaded}
        self.suspects = Suspects({})
        self.warned_half_published = False
        self.pending: list[str] = []  # dead models unloaded while the repository was half-published
        self.last_failure: str | None = None
        self.events: list[str] = []

    def restarted(self) -> None:
        """Start afresh after tritonserver was restarted: it loaded the models as they are on disk now."""
        self.serial = self.store.journal().serial
        self.signatures = {model: self.store.signature(model) for model in self.server.loaded}
        self.suspects = Suspects({})
        self.pending = []

    def log(self, message: str) -> None:
        """Report one event (with the time) and remember it."""
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        self.events.append(line)
        self.echo(line)

    def tick(self) -> None:
        """One round of rollout and healing, skipped while a writer holds the publish lock; a failing round is
        reported (once per kind of failure) and the next one tries again: serving goes on."""
        try:
            with self.store.watching() as held:
                if not held:
                    return
                with self._client() as client:
                    complete = self._rollout(client)
                    self._heal(client, complete)
        except Exception as error:  # the server is what matters: a round that fails must not stop it
            reason = f"{type(error).__name__}: {error}"
            if reason != self.last_failure:
                self.log(f"watcher: this round failed, retrying each second ({reason})")
            self.last_failure = reason
            return
        self.last_failure = None

    @contextlib.contextmanager
    def _client(self) -> Any:
        client = self.server.grpc_client()
        try:
            yield client
        finally:
            client.close()

    # Rollout ---------------------------------------------------------------------------------------------
    def _wanted(self) -> list[str]:
        models = list(self.server.loaded)
        if self.serve_all:
            models += [m for m in self.store.models() if m not in models]
        return models

    def _ordered(self, models: list[str]) -> list[str]:
        """Composing models first: ensembles (platform "ensemble") after the models they use."""
        def is_ensemble(model: str) -> bool:
            return 'platform: "ensemble"' in (self.store.read(f"{model}/{CONFIG_FILE}") or "")

        return sorted(models, key=is_ensemble)

    def _rollout(self, client: Any) -> bool:
        """Load what a committed update changed; False (nothing loaded) while the repository is half-published."""
        journal = self.store.journal()
        if journal.publishing:
            if not self.warned_half_published:
                self.log(f"{self.server.repo} is half-published (an interrupted `patcher triton`): serving the "
                         "versions already loaded until `patcher triton` runs again")
                self.warned_half_published = True
            return False
        self.warned_half_published = False
        if journal.serial == self.serial and not self.pending:
            return True
        changed = [m for m in self._wanted() if self.store.signature(m) != self.signatures.get(m)]
        healed = list(self.pending)
        changed += [m for m in healed if m not in changed]
        for model in self._ordered(changed):
            versions = self.store.versions(model)
            started = time.perf_counter()
            try:
                self.server.load_model(model)
            except PatcherError as error:
                self.log(f"rollout: {model} did not load, the loaded version keeps serving: {error}")
                continue
            self.signatures[model] = self.store.signature(model)
            self.log(f"rollout: {model} version {versions[-1] if versions else '?'} serving "
                     f"({time.perf_counter() - started:.1f} s)")
        if healed:
            self._reload_not_ready(client)
        self.pending, self.serial = [], journal.serial  # only now: a round cut short is taken up by the next
        return True

    # Healing ---------------------------------------------------------------------------------------------
    def _configs(self, client: Any) -> dict[str, dict[str, Any]]:
        from tritonclient.utils import InferenceServerException

        configs = {}
        for model in self.server.loaded:
            with contextlib.suppress(InferenceServerException):
                if client.is_model_ready(model):
                    configs[model] = client.get_model_config(model, as_json=True)["config"]
        return configs

    def _heal(self, client: Any, complete: bool) -> None:
        if self.server.pgid is None:
            return
        configs = self._configs(client)
        for model in self.suspects.find(client, self.server.pgid, configs):
            message = probe(client, model, configs[model])
            if not backend_died(message):
                continue
            started = time.perf_counter()
            if not complete:
                self.log(f"healing: {model}'s backend process died ({message}); unloaded, to be loaded once "
                         "`patcher triton` has completed the half-published repository")
                with contextlib.suppress(PatcherError):
                    self.server.unload_model(model, forget=False)
                self.pending.append(model)
                continue
            self.log(f"healing: {model}'s backend process died ({message}); unloading and loading it again")
            try:
                self.server.unload_model(model, forget=False)
                self.server.load_model(model)
            except PatcherError as error:
                self.log(f"healing: {model} did not load again: {error}")
                continue
            self._reload_not_ready(client)
            self.suspects.failures.pop(model, None)
            self.log(f"healing: {model} serving again ({time.perf_counter() - started:.1f} s)")

    def _reload_not_ready(self, client: Any) -> None:
        """Load again the served models that went unavailable with a healed one (the ensembles that use it)."""
        from tritonclient.utils import InferenceServerException

        for model in self._ordered(self.server.loaded):
            with contextlib.suppress(InferenceServerException):
                if client.is_model_ready(model):
                    continue
            try:
                self.server.load_model(model)
            except PatcherError as error:
                self.log(f"healing: {model} did not load again: {error}")
