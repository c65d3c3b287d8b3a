"""``--preload``: the arbiter imports the application once, and its workers are forked from it.

By default the arbiter never imports the application (``probe.py`` says why); each worker
imports it after the fork, so each holds its own copy of everything the import built. With
``preload`` the arbiter imports it before forking, and the workers share those pages with the
arbiter copy-on-write: a monolith whose import builds hundreds of MB pays for them once
(``docs/workers.md`` has the measurement).

What changes:

- **Start**: the arbiter loads the code and layers the settings itself (no probe), then freezes
  the garbage collector's view of what the import built (``gc.freeze()``): a collection in a
  worker would otherwise write to every object's header and copy the pages it meant to share.
- **Workers**: they use the arbiter's server object (no import), and start afresh as always
  (``fork.py``): a descriptor the import opened is closed in them, so connections are made in
  ``post_fork`` or lazily, not at import.
- **SIGHUP**: reloads the settings, not the code (gunicorn's rule): the probe layers the config
  file, the environment and the flags afresh on the code's own settings, the code stays the one
  the arbiter imported, and the new workers are forked from it. New code needs a restart.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

from kitegreen.config import Config
from kitegreen.config.hook_settings import HOOK_NAMES, import_path
from kitegreen.exceptions import ConfigError, LaunchError
from kitegreen.exits import EXIT_USAGE
from kitegreen.workers.probe import check_fits_workers
from kitegreen.workers.worker import Application


def preload(app: Application, log: Any) -> tuple[Application, Config] | int:
    """Load the application in the arbiter.

    Returns:
        How the probe (``load``: the settings afresh) and the workers (``load_code``: the
        loaded server) get the application from now on, and the instance's settings; or the
        exit status 2 when it would not load (logged by then).
    """
    if app.layer is None:
        raise ValueError("preload needs an Application that can layer the settings")
    layer = app.layer
    try:
        server = app.load_code()
        code_config = server.config
        server.reconfigure(layer(code_config))
        check_fits_workers(server)
    except (LaunchError, ConfigError) as exc:
        app.on_load_error(exc)
        return EXIT_USAGE
    log.info("application preloaded in the arbiter", service=server.config.service_name)
    # What the import built is shared with the workers from here on; see the module docstring.
    gc.collect()
    gc.freeze()

    def reload_settings() -> Any:
        # In the reload's probe, a child: the settings afresh on the code's, the code as loaded.
        server.reconfigure(layer(code_config))
        return server

    loaded = dataclasses.replace(app, load=reload_settings, load_code=lambda: server)
    # Hooks by their import paths, as a reload's probe reports them: the same spelling on both
    # sides, so that a reload does not take them for changed settings.
    config = server.config
    return loaded, config.replace(
        **{name: import_path(name, getattr(config, name)) for name in HOOK_NAMES}
    )
