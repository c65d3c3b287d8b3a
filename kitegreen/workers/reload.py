"""SIGHUP's rolling reload, as a state machine the arbiter drives: probe -> roll -> complete,
or abort.

- **probing**: a probe (``probe.py``) loads the code and the settings afresh while the
  arbiter's loop goes on; its result comes back as a ``("probed", probe, result)`` event. If
  it fails, or the new settings do not fit the ones only a restart changes, the reload is
  refused and nothing changes.
- **rolling**: the new settings are adopted under a new generation number; the arbiter starts
  a new worker, stops an old one once the new one is ready, and so on (``Arbiter._manage``).
  The new generation's start-up crashes are counted apart (:attr:`RollingReload.crashes`).
- **complete**: no old worker is left; the new generation's crash count becomes the one in
  service.
- **aborted**: the new generation kept crashing at start-up: its workers are stopped and the
  previous settings, generation and number of workers come back.

One reload at a time: a SIGHUP during one starts another when it ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent

from kitegreen.config import Config
from kitegreen.config.settings import restart_fields
from kitegreen.exceptions import ConfigError
from kitegreen.workers.crashes import CrashPolicy
from kitegreen.workers.probe import Probe, probe_timeout, start_probe
from kitegreen.workers.worker import Application

RESTART_FIELDS = restart_fields()
"""Settings the arbiter itself uses and cannot change without a restart; a reload keeps them
and says so if the new configuration differs."""
PROBE_JOIN = 6.0
"""Seconds :meth:`RollingReload.close` waits for a cancelled probe's waiter."""


class RollingReload:
    """The reload state of one arbiter.

    Args:
        app: how the probe loads the application.
        log: a structlog logger.
        post: queues an event for the arbiter's loop.
        push_event: records an event in the instance's ring.
        may_reload: whether the instance is serving (a stopping one refuses a reload).
        signal_handles: the arbiter's signal handles, cancelled in the probe.
        settings: the settings in force and the number of workers wanted.
        adopt: makes settings and a number of workers the ones in force.
        stop_generation: asks every worker of a generation to stop.
    """

    def __init__(
        self,
        app: Application,
        log: Any,
        *,
        post: Callable[[tuple[Any, ...]], None],
        push_event: Callable[[str, str], object],
        may_reload: Callable[[], bool],
        signal_handles: Callable[[], list[Any]],
        settings: Callable[[], tuple[Config, int]],
        adopt: Callable[[Config, int], None],
        stop_generation: Callable[[int], None],
    ) -> None:
        self._app = app
        self.log = log
        self._post = post
        self._push_event = push_event
        self._may_reload = may_reload
        self._signal_handles = signal_handles
        self._settings = settings
        self._adopt = adopt
        self._stop_generation = stop_generation
        self.generation = 0
        """The generation in service (or being rolled out)."""
        self._generations = 0
        """Generations started so far: an aborted reload's number is never used again."""
        self.crashes: CrashPolicy | None = None
        """While rolling, start-up crashes of the new generation."""
        self._before: tuple[Config, int, int] | None = None
        """While rolling: the settings, generation and workers wanted to go back to."""
        self._pending = False
        self._probe: Probe | None = None
        """The probe while it loads the application."""
        self._probe_waiter: gevent.Greenlet | None = None

    @property
    def rolling(self) -> bool:
        """Whether a new generation is being rolled out."""
        return self._before is not None

    def request(self) -> None:
        """SIGHUP: start a reload, or another once the one under way ends."""
        if not self._may_reload():
            self.log.warning("signal ignored: the instance is stopping", signal="SIGHUP")
            return
        if self.rolling or self._probe is not None:
            # One reload at a time: the next starts from the settings this one brings in.
            self._pending = True
            self.log.info("a reload is in progress; reloading again once it ends")
            return
        self.log.info("reloading: loading the application and its settings afresh")
        probe = start_probe(self._app, signal_handles=self._signal_handles(), log=self.log)
        if isinstance(probe, int):
            self._refuse("the probe could not be started")
            return
        self._probe = probe
        # The probe loads the application in its own time; the loop goes on supervising (and
        # acting on signals) meanwhile, and hears of the result as an event.
        config, _ = self._settings()
        self._probe_waiter = gevent.spawn(
            self._await_probe, probe, probe_timeout(config.worker_timeout)
        )

    def probed(self, probe: Probe, new: Config | int) -> None:
        """The probe's result: roll the new settings out, or refuse the reload."""
        if probe is not self._probe:
            return  # cancelled: the instance is stopping
        self._probe = self._probe_waiter = None
        if isinstance(new, int):
            self._refuse("the probe could not load the application and its settings")
            return
        old, wanted = self._settings()
        kept = [name for name in RESTART_FIELDS if getattr(new, name) != getattr(old, name)]
        try:
            config = new.replace(**{name: getattr(old, name) for name in RESTART_FIELDS})
        except ConfigError as exc:
            self._refuse(f"the new settings do not fit the ones kept: {exc}")
            return
        if kept:
            self.log.warning(
                "these settings change only with a restart; kept as they were", settings=kept
            )
        self._before = (old, self.generation, wanted)
        self._generations += 1
        self.generation = self._generations
        self.crashes = CrashPolicy()
        self._adopt(config, config.workers)
        self.log.info("rolling reload", generation=self.generation, workers=config.workers)
        self._push_event("Reload", f"generation {self.generation}")

    def rescaled(self, wanted: int) -> None:
        """TTIN/TTOU during a roll: an aborted reload goes back to ``wanted`` workers, not to
        the number before the reload."""
        if self._before is not None:
            config, generation, _ = self._before
            self._before = (config, generation, wanted)

    def complete(self) -> CrashPolicy | None:
        """No old worker is left: the reload is done.

        Returns:
            The new generation's crash count, now the one in service (crashes counted so far
            included).
        """
        crashes, self.crashes = self.crashes, None
        self._before = None
        self.log.info("reload complete", generation=self.generation)
        self._request_if_pending()
        return crashes

    def abort(self, last_exit: str) -> None:
        """The new generation keeps crashing: stop it and go back to the previous one."""
        assert self._before is not None
        aborted = self.generation
        config, self.generation, wanted = self._before
        self._before = None
        self.crashes = None
        self._stop_generation(aborted)
        self._adopt(config, wanted)
        self.log.error(
            "reload aborted: the new workers keep exiting at start-up; the previous generation "
            "keeps serving with its settings",
            generation=aborted,
            restored_generation=self.generation,
            last_exit=last_exit,
        )
        self._push_event("Reload", f"generation {aborted} aborted: {last_exit}")
        self._request_if_pending()

    def cancel(self) -> None:
        """The instance is stopping: forget a pending reload, cancel a probe under way."""
        self._pending = False
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()

    def close(self) -> None:
        """Cancel, and wait for a probe's waiter to return."""
        self.cancel()
        if self._probe_waiter is not None:
            self._probe_waiter.join(timeout=PROBE_JOIN)

    def _await_probe(self, probe: Probe, timeout: float) -> None:
        self._post(("probed", probe, probe.result(timeout)))

    def _refuse(self, why: str) -> None:
        self.log.error("reload refused; the workers keep serving", reason=why)
        self._push_event("Reload", f"refused: {why}")
        self._request_if_pending()

    def _request_if_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.request()
