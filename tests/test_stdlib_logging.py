"""The standard library's ``logging`` in a launched server: an application's records come out in
kitegreen's format and stream, with the request's context, at the chosen level, or as a
``--log-config`` dictConfig document says."""

from __future__ import annotations

import io
import json
import logging
import signal
from pathlib import Path
from typing import Any

import pytest
from clients import thriftpy2_client
from conftest import TESTS, testsvc_thrift, wait_until
from launching import Launcher, json_lines, launcher_env
from test_header_protocols import LOG_ID, tt_call, tt_roundtrip

from kitegreen.observability import logs

pytestmark = pytest.mark.timeout(60)

QUIET = ("--port", "0", "--host", "127.0.0.1", "--no-enable-debug-server")

MONOLITH = f"""
import logging
import sys
import gevent
sys.path.insert(0, {str(TESTS)!r})
import kitegreen
from conftest import Handler, testsvc_thrift

log = logging.getLogger("monolith.views")


class Views(Handler):
    def echo(self, message):
        # "LEVEL:text" logs text at LEVEL through the standard library; "exception:text"
        # logs it with the traceback of the exception being handled; "spawn:" spawns a
        # greenlet that raises.
        level, _, text = message.partition(":")
        if level == "spawn":
            gevent.spawn(lambda: {{}}["in a greenlet"]).join()
        elif level == "exception":
            try:
                {{}}["missing"]
            except KeyError:
                log.exception(text)
        else:
            log.log(logging.getLevelName(level.upper()), text, extra={{"order": 17}})
        return message


server = kitegreen.RpcServer(testsvc_thrift.TestService, Views(), kitegreen.Config(port=0))
"""
"""A target whose handler logs through ``logging``, as a monolith's views do."""


@pytest.fixture
def target(tmp_path: Path) -> str:
    path = tmp_path / "monolith.py"
    path.write_text(MONOLITH, encoding="utf-8")
    return f"{path}:server"


def call(launcher: Launcher, message: str) -> None:
    with thriftpy2_client(testsvc_thrift.TestService, launcher.address()) as client:
        assert client.echo(message) == message


def stop(launcher: Launcher) -> None:
    launcher.proc.send_signal(signal.SIGTERM)
    assert launcher.wait() == 0, launcher.output()


def every_line_is_json(lines: list[str]) -> list[dict[str, Any]]:
    """Every line of standard error parsed as a JSON object; fails on the first that is not."""
    records = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        records.append(record)
    return records


@pytest.mark.slow
class TestJson:
    def test_a_handlers_logging_call_is_one_json_line_with_the_request(self, target):
        """``logging.getLogger(...).info`` in a handler appears once, as JSON naming the
        logger, the level, the method and the peer, with the record's ``extra`` fields."""
        with Launcher(target, *QUIET) as launcher:
            call(launcher, "info:monolith says hi")
            launcher.wait_for_event("monolith says hi")
            stop(launcher)
        records = every_line_is_json(launcher.stderr)
        (record,) = [r for r in records if r["event"] == "monolith says hi"]
        assert record["logger"] == "monolith.views"
        assert record["level"] == "info"
        assert record["method"] == "echo"
        assert record["peer"] == "127.0.0.1"
        assert record["order"] == 17
        assert record["pid"] == launcher.proc.pid
        assert "timestamp" in record

    def test_the_log_id_of_a_ttheader_request_is_bound(self, target):
        """A TTHeader request's log id is on the handler's ``logging`` records."""
        with Launcher(target, *QUIET) as launcher:
            request = tt_call(message="info:with a log id", int_kv={LOG_ID: "20261205-L7"})
            tt_roundtrip(launcher.address(), request)
            record = launcher.wait_for_event("with a log id")
            stop(launcher)
        assert (record["log_id"], record["method"]) == ("20261205-L7", "echo")

    def test_a_warning_is_json_not_bare_text(self, target):
        """A warning, which Python's last-resort handler would print bare, is a JSON line."""
        with Launcher(target, *QUIET) as launcher:
            call(launcher, "warning:careful now")
            record = launcher.wait_for_event("careful now")
            stop(launcher)
        every_line_is_json(launcher.stderr)
        assert (record["level"], record["logger"]) == ("warning", "monolith.views")

    def test_an_exception_keeps_its_traceback(self, target):
        """``log.exception`` renders the traceback into ``exception``, as kitegreen's panics."""
        with Launcher(target, *QUIET) as launcher:
            call(launcher, "exception:lookup failed")
            record = launcher.wait_for_event("lookup failed")
            stop(launcher)
        every_line_is_json(launcher.stderr)
        assert record["level"] == "error"
        assert record["exception"].startswith("Traceback (most recent call last):")
        assert "KeyError: 'missing'" in record["exception"]
        assert record["method"] == "echo"

    def test_a_python_warning_is_a_json_line(self, target):
        """``warnings.warn`` at import, which Python prints bare, is a ``py.warnings`` record."""
        module = Path(target.partition(":")[0])
        module.write_text(
            module.read_text() + "\nimport warnings\nwarnings.warn('old api', UserWarning)\n",
            encoding="utf-8",
        )
        with Launcher(target, *QUIET) as launcher:
            launcher.address()
            stop(launcher)
        records = every_line_is_json(launcher.stderr)
        (record,) = [r for r in records if "old api" in r["event"]]
        assert (record["logger"], record["level"]) == ("py.warnings", "warning")
        assert "UserWarning" in record["event"]

    def test_a_failed_greenlet_is_one_json_line(self, target):
        """A greenlet's uncaught exception, which gevent prints bare, is a JSON line with its
        traceback."""
        with Launcher(target, *QUIET) as launcher:
            call(launcher, "spawn:")
            record = launcher.wait_for_event("greenlet failed")
            stop(launcher)
        every_line_is_json(launcher.stderr)
        assert record["level"] == "error"
        assert "KeyError: 'in a greenlet'" in record["exception"]
        assert record["greenlet"].startswith("<Greenlet")

    def test_a_failed_greenlet_in_a_worker_is_one_json_line(self, target):
        """The same in a worker, which runs a hub of its own."""
        with Launcher(target, *QUIET, "--workers", "2") as launcher:
            call(launcher, "spawn:")
            record = launcher.wait_for_event("greenlet failed")
            stop(launcher)
        every_line_is_json(launcher.stderr)
        assert record["pid"] != launcher.proc.pid
        assert "KeyError: 'in a greenlet'" in record["exception"]

    def test_the_request_context_ends_with_the_call(self, target):
        """A record logged outside any request (the target's import) names no method."""
        module = Path(target.partition(":")[0])
        module.write_text(
            module.read_text() + "\nlog.warning('imported')\n",
            encoding="utf-8",
        )
        with Launcher(target, *QUIET) as launcher:
            record = launcher.wait_for_event("imported")
            launcher.address()  # serving: SIGTERM is handled from here on
            stop(launcher)
        assert "method" not in record
        assert "peer" not in record

    def test_each_worker_writes_whole_lines(self, target):
        """With two workers sharing standard error, every line is still one JSON object."""
        with Launcher(target, *QUIET, "--workers", "2") as launcher:
            for n in range(20):
                call(launcher, f"warning:worker line {n}")
            assert wait_until(lambda: len(launcher.named("worker line 19")) == 1)
            stop(launcher)
        records = every_line_is_json(launcher.stderr)
        lines = [r for r in records if str(r["event"]).startswith("worker line")]
        assert len(lines) == 20
        assert {r["method"] for r in lines} == {"echo"}


@pytest.mark.slow
class TestConsole:
    def test_records_render_like_kitegreens_own(self, target):
        """--log-format console: the level in brackets, the logger's name, the context."""
        with Launcher(target, *QUIET, "--log-format", "console") as launcher:
            wait_until(lambda: any("listening" in line for line in launcher.stderr))
            address = next(
                line.split("address=")[1].split()[0]
                for line in launcher.stderr
                if "listening" in line
            )
            host, _, port = address.rpartition(":")
            with thriftpy2_client(testsvc_thrift.TestService, (host, int(port))) as client:
                client.echo("info:console line")
            wait_until(lambda: any("console line" in line for line in launcher.stderr))
            stop(launcher)
        (line,) = [line for line in launcher.stderr if "console line" in line]
        assert "[info" in line
        assert "[monolith.views]" in line
        assert "method=echo" in line
        assert "peer=127.0.0.1" in line
        assert json_lines([line]) == []


@pytest.mark.slow
class TestLevel:
    def test_log_level_applies_to_logging_records(self, target, tmp_path):
        """--log-level warning drops an info record and keeps a warning.

        At warning the launcher does not log where it listens: it serves on a Unix socket.
        """
        path = tmp_path / "kg.sock"
        args = ("--unix", str(path), "--no-enable-debug-server", "--log-level", "warning")
        with Launcher(target, *args) as launcher:
            assert wait_until(path.exists)
            for message in ("info:not wanted", "warning:wanted"):
                with thriftpy2_client(testsvc_thrift.TestService, str(path)) as client:
                    assert client.echo(message) == message
            # Both records were handled in call order, so once the second is out the first
            # would have been too.
            launcher.wait_for_event("wanted")
            stop(launcher)
        events = [r["event"] for r in every_line_is_json(launcher.stderr)]
        assert "wanted" in events
        assert "not wanted" not in events

    def test_upper_case_level_is_accepted(self, target):
        """--log-level DEBUG, as gunicorn and Python spell it, is debug."""
        with Launcher(target, *QUIET, "--log-level", "DEBUG") as launcher:
            call(launcher, "debug:fine detail")
            record = launcher.wait_for_event("fine detail")
            stop(launcher)
        assert record["level"] == "debug"


@pytest.mark.slow
class TestLogConfig:
    def test_a_yaml_dict_config_combines_with_kitegreens_handler(self, target, tmp_path):
        """A dictConfig document sets a logger's level and adds a file handler that uses the
        ``kitegreen`` formatter; without a ``root`` section, records still reach standard error
        through kitegreen's handler."""
        logfile = tmp_path / "monolith.log"
        document = tmp_path / "logging.yaml"
        document.write_text(
            "version: 1\n"
            "disable_existing_loggers: false\n"
            "handlers:\n"
            "  file:\n"
            "    class: logging.FileHandler\n"
            f"    filename: {logfile}\n"
            "    formatter: kitegreen\n"
            "loggers:\n"
            "  monolith:\n"
            "    level: WARNING\n"
            "    handlers: [file]\n",
            encoding="utf-8",
        )
        with Launcher(target, *QUIET, "--log-config", str(document)) as launcher:
            call(launcher, "info:below the document's level")
            call(launcher, "warning:to both")
            launcher.wait_for_event("to both")
            stop(launcher)
        events = [r["event"] for r in every_line_is_json(launcher.stderr)]
        assert events.count("to both") == 1
        assert "below the document's level" not in events
        (in_file,) = every_line_is_json(logfile.read_text().splitlines())
        assert (in_file["event"], in_file["logger"], in_file["method"]) == (
            "to both",
            "monolith.views",
            "echo",
        )

    def test_workers_write_to_the_documents_file(self, target, tmp_path):
        """The handlers are made in the arbiter: its workers keep their files open and write
        to them, each line whole."""
        logfile = tmp_path / "monolith.log"
        document = tmp_path / "logging.json"
        document.write_text(
            json.dumps(
                {
                    "handlers": {
                        "file": {
                            "class": "logging.FileHandler",
                            "filename": str(logfile),
                            "formatter": "kitegreen",
                        }
                    },
                    "root": {"handlers": ["file"]},
                }
            ),
            encoding="utf-8",
        )
        with Launcher(target, *QUIET, "-w", "2", "--log-config", str(document)) as launcher:
            for n in range(10):
                call(launcher, f"warning:from a worker {n}")
            assert wait_until(lambda: logfile.read_text().count("from a worker") == 10)
            stop(launcher)
        records = every_line_is_json(logfile.read_text().splitlines())
        assert {r["pid"] for r in records} - {launcher.proc.pid}
        assert not any("from a worker" in line for line in launcher.stderr)
        assert "Logging error" not in launcher.output()

    def test_the_document_may_route_the_root_logger(self, target, tmp_path):
        """A ``root`` section replaces kitegreen's default one: here its own level (ERROR)
        and kitegreen's handler by name; set from KITE_LOG_CONFIG, in TOML."""
        document = tmp_path / "logging.toml"
        document.write_text(
            'version = 1\n[root]\nlevel = "ERROR"\nhandlers = ["kitegreen"]\n', encoding="utf-8"
        )
        env = launcher_env(KITE_LOG_CONFIG=str(document))
        with Launcher(target, *QUIET, env=env) as launcher:
            call(launcher, "warning:below root")
            call(launcher, "exception:at root's level")
            launcher.wait_for_event("at root's level")
            stop(launcher)
        events = [r["event"] for r in every_line_is_json(launcher.stderr)]
        assert "below root" not in events
        assert "listening" in events  # kitegreen's own lines keep --log-level

    def test_an_invalid_document_exits_two_naming_the_file(self, target, tmp_path):
        """A document dictConfig refuses stops the launch with status 2 and the reason."""
        document = tmp_path / "logging.json"
        document.write_text('{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}')
        with Launcher(target, *QUIET, "--log-config", str(document)) as launcher:
            assert launcher.wait() == 2
        stderr = "".join(launcher.stderr)
        assert f"log config file {document} is not a valid dictConfig document" in stderr
        assert "Unable to configure handler 'h': Cannot resolve 'no.such.Handler'" in stderr

    def test_an_ini_file_is_refused(self, target, tmp_path):
        """gunicorn's --log-config takes a fileConfig ini file; kitegreen says it does not."""
        document = tmp_path / "logging.ini"
        document.write_text("[loggers]\nkeys=root\n")
        with Launcher(target, *QUIET, "--log-config", str(document)) as launcher:
            assert launcher.wait() == 2
        stderr = "".join(launcher.stderr)
        assert "log_config must name a dictConfig document ending in .yml" in stderr
        assert "(from --log-config)" in stderr


class TestFormatterInProcess:
    """``logs.configure`` in this process; structlog's and the root logger's setup restored."""

    @pytest.fixture
    def stream(self, json_log_stream: io.StringIO) -> io.StringIO:
        return json_log_stream

    def test_extra_fields_come_without_another_formatters_leftovers(self, stream):
        """A record another handler formatted first (which sets ``message`` and ``asctime`` on
        it) comes out with its ``extra`` fields only, and ``extra`` cannot replace ``event``."""
        other = logging.StreamHandler(io.StringIO())
        other.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log = logging.getLogger("monolith.inprocess")
        log.addHandler(other)
        try:
            log.warning("paid", extra={"order": 42, "event": "not the event"})
        finally:
            log.removeHandler(other)
        record = json.loads(stream.getvalue())
        assert record["event"] == "paid"
        assert record["order"] == 42
        assert "message" not in record
        assert "asctime" not in record

    def test_one_handler_however_often_configured(self, stream):
        """Configuring again replaces kitegreen's root handler: each record is written once."""
        logs.configure("json", "info", stream=stream)
        logging.getLogger("monolith.inprocess").warning("once")
        assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["once"]
