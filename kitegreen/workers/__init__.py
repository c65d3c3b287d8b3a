"""``--workers N``: one kitegreen instance as an arbiter and N worker processes.

=================  ==============================================================================
``arbiter.py``     binds the listener once, runs the instance, forks the workers, reaps and
                   replaces them, handles the signals (HUP rolling reload, TTIN/TTOU,
                   TERM/INT/QUIT), checks heartbeats
``crashes.py``     when a worker's exit is a start-up crash, the backoff, when to give up
``fleet.py``       the workers as the instance (``kitegreen/instance.py``) governs them: each
                   one's share of the limits, their summed metrics, /runtime/kite's rows
``reload.py``      SIGHUP's rolling reload: probe, roll, complete or abort
``stats.py``       the workers' counters gathered over their control channels and summed
``probe.py``       a forked child that imports the application and reports its settings
``worker.py``      what runs in a worker after the fork: an engine, no instance
``fork.py``        forking a gevent process and starting afresh in the child
``control.py``     the arbiter<->worker channel (JSON lines over a socketpair): ready, stats,
                   limits, stop
``board.py``       shared memory: each worker's heartbeat, open connections, accepting or not
``balance.py``     the accept gate that shares new connections out evenly among the workers
``heartbeat.py``   the worker's greenlet that stamps its heartbeat, and its watchdog thread
``process.py``     the arbiter's handle on one worker
=================  ==============================================================================

Imports flow one way: ``cli`` -> ``workers`` -> ``server``; nothing but ``cli`` imports this
package. The arbiter never imports the application.
"""
