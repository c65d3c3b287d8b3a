"""Config: validation, the layering of its sources, kite's spellings, and the public API."""

from __future__ import annotations
import __future__

import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap

import pytest

import kitegreen
from kitegreen import Config, ConfigError
from kitegreen.config import (
    DEFAULT_CONSUL_ADDR,
    DEFAULT_DRAIN_TIME_REGISTERED,
    DEFAULT_LIMIT_QPS,
    check_endpoint_qps_limits,
    check_int,
)
from kitegreen.config.help import help_line, placeholder
from kitegreen.config.settings import GROUPS


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


class TestValidation:
    @pytest.mark.parametrize(
        ("field", "value", "expected"),
        [
            ("port", 70000, "port must be an integer between 0 and 65535, got 70000"),
            ("port", -1, "port must be an integer between 0 and 65535, got -1"),
            ("debug_port", 65536, "debug_port must be an integer between 0 and 65535"),
            ("backlog", 0, "backlog must be an integer between 1 and 65535, got 0"),
            ("limit_qps", -5, "limit_qps must be an integer >= 0, got -5"),
            ("limit_connections", -1, "limit_connections must be an integer >= 0, got -1"),
            ("max_frame_size", 100, "max_frame_size must be an integer between 1024"),
            ("read_write_timeout", 0, "read_write_timeout must be a number of seconds > 0, got 0"),
            ("read_write_timeout", float("inf"), "read_write_timeout must be a number of seconds"),
            ("idle_timeout", -1.0, "idle_timeout must be a number >= 0, got -1.0"),
            ("exit_wait_time", float("nan"), "exit_wait_time must be a finite number"),
            ("listen_type", "udp", "listen_type must be one of auto, tcp, unix, got 'udp'"),
            ("log_format", "xml", "log_format must be one of auto, json, console, got 'xml'"),
            ("log_level", "loud", "log_level must be one of debug, info, warning"),
            ("health_check", "http", "health_check must be one of tcp, ttl, none, got 'http'"),
            ("limit_qps", 2.5, "limit_qps must be an integer >= 0, got 2.5"),
            ("port", True, "port must be an integer between 0 and 65535, got True"),
            ("workers", 0, "workers must be an integer between 1 and 1024, got 0"),
            ("workers", 1025, "workers must be an integer between 1 and 1024, got 1025"),
            ("worker_timeout", 0.0, "worker_timeout must be a number of seconds > 0, got 0.0"),
            ("drain_time", -1.0, "drain_time must be a number >= 0, got -1.0"),
            ("drain_time", float("inf"), "drain_time must be a finite number"),
            ("debug_max_connections", 0, "debug_max_connections must be an integer between 1"),
            ("debug_idle_timeout", 0.0, "debug_idle_timeout must be a number of seconds > 0"),
            (
                "debug_max_connections_per_peer",
                0,
                "debug_max_connections_per_peer must be an integer between 1",
            ),
            ("debug_request_timeout", 0.0, "debug_request_timeout must be a number of seconds > 0"),
        ],
    )
    def test_wrong_value_names_field_and_expectation(self, field, value, expected):
        """A value out of range raises ConfigError saying which field and what was expected."""
        with pytest.raises(ConfigError) as info:
            Config(**{field: value})
        assert expected in str(info.value)
        assert info.value.field == field
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, kitegreen.KitegreenError)

    def test_endpoint_qps_limit_must_be_a_non_negative_integer(self):
        """A per-method QPS limit that is negative is refused, naming the method."""
        with pytest.raises(
            ConfigError, match=r"endpoint_qps_limits\['echo'\] must be an integer >= 0"
        ):
            Config(endpoint_qps_limits={"echo": -1})

    def test_new_settings_have_their_defaults(self):
        """workers, worker_timeout, drain_time, trusted_proxies, enforce_rpc_timeout and the debug
        server's limits start at their documented defaults."""
        config = Config()
        assert config.workers == 1
        assert config.worker_timeout == 30.0
        assert config.drain_time is None
        assert config.trusted_proxies == ()
        assert config.enforce_rpc_timeout is False
        assert (config.debug_max_connections, config.debug_idle_timeout) == (32, 10.0)
        assert (config.debug_max_connections_per_peer, config.debug_request_timeout) == (16, 5.0)
        assert config.log_format == "auto"

    def test_unix_listen_type_needs_a_path(self):
        """listen_type unix without unix_socket says the path is missing."""
        with pytest.raises(ConfigError, match="unix_socket") as info:
            Config(listen_type="unix")
        assert info.value.field == "unix_socket"

    def test_service_mesh_mode_needs_an_address(self):
        """service_mesh_mode without an ingress address is refused."""
        with pytest.raises(ConfigError, match="service_mesh_ingress_addr"):
            Config(service_mesh_mode=True)

    def test_defaults_are_valid(self):
        """The defaults form a valid config with kite's port and cluster."""
        config = Config()
        assert config.port == 8888
        assert config.cluster == "default"
        assert config.effective_listen_type == "tcp"

    def test_unix_socket_makes_auto_listen_unix(self):
        """listen_type auto listens on the Unix socket when a path is given."""
        assert Config(unix_socket="/tmp/x.sock").effective_listen_type == "unix"
        assert Config(unix_socket="/tmp/x.sock", listen_type="tcp").effective_listen_type == "tcp"

    def test_config_is_frozen(self):
        """A Config cannot be changed in place; replace() validates the copy."""
        config = Config()
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.port = 1  # type: ignore[misc]
        assert config.replace(port=1).port == 1
        with pytest.raises(ConfigError, match="port"):
            config.replace(port=-1)

    def test_endpoint_limits_do_not_follow_the_callers_dict(self):
        """Changing the dict passed in does not change the config's limits."""
        limits = {"echo": 5}
        config = Config(endpoint_qps_limits=limits)
        limits["echo"] = 500
        assert config.endpoint_qps_limits["echo"] == 5
        with pytest.raises(TypeError):
            config.endpoint_qps_limits["echo"] = 1  # type: ignore[index]


class TestSharedChecks:
    """One check for counts and limits, used by Config and by update_limits alike."""

    @pytest.mark.parametrize("value", [-5, 2.5, "10", True, None])
    def test_check_int_refuses_what_is_not_a_count(self, value):
        """Negative numbers, floats, strings, booleans and None are refused with one message."""
        with pytest.raises(ConfigError) as info:
            check_int("limit_qps", value)
        assert str(info.value) == f"limit_qps must be an integer >= 0, got {value!r}"
        assert info.value.field == "limit_qps"

    def test_check_int_with_bounds(self):
        """A bounded check says between which values."""
        check_int("workers", 1024, 1, 1024)
        with pytest.raises(ConfigError, match="workers must be an integer between 1 and 1024"):
            check_int("workers", 1025, 1, 1024)

    def test_endpoint_limits_name_the_method_and_the_field(self):
        """A bad per-method limit names the method; the error's field is endpoint_qps_limits."""
        check_endpoint_qps_limits({"echo": 0, "add": 5})
        with pytest.raises(ConfigError) as info:
            check_endpoint_qps_limits({"echo": "5"})
        assert str(info.value) == "endpoint_qps_limits['echo'] must be an integer >= 0, got '5'"
        assert info.value.field == "endpoint_qps_limits"


class TestDrainTime:
    def test_unset_drain_time_depends_on_registration(self):
        """Unset, a registered server drains for the default, an unregistered one not at all."""
        config = Config()
        assert config.effective_drain_time(registered=True) == DEFAULT_DRAIN_TIME_REGISTERED
        assert config.effective_drain_time(registered=False) == 0.0

    @pytest.mark.parametrize("registered", [True, False])
    def test_set_drain_time_is_used_as_it_is(self, registered):
        """A drain_time that is set applies whether or not the server registers."""
        assert Config(drain_time=1.5).effective_drain_time(registered=registered) == 1.5
        assert Config(drain_time=0.0).effective_drain_time(registered=registered) == 0.0


class TestTrustedProxies:
    def test_networks_are_normalised(self):
        """Each entry is kept as ipaddress spells the network: host bits cleared, /32 added."""
        config = Config(trusted_proxies=("10.1.2.3/8", "192.168.1.7", " fd00::1/8 "))
        assert config.trusted_proxies == ("10.0.0.0/8", "192.168.1.7/32", "fd00::/8")

    def test_a_list_becomes_a_tuple(self):
        """A list given in code is copied into a tuple: the config stays frozen."""
        proxies = ["10.0.0.0/8"]
        config = Config(trusted_proxies=proxies)  # type: ignore[arg-type]
        proxies.append("0.0.0.0/0")
        assert config.trusted_proxies == ("10.0.0.0/8",)

    @pytest.mark.parametrize("entry", ["10.0.0.0/33", "localhost", "", "10.0.0.300"])
    def test_bad_entry_is_named(self, entry):
        """An entry that is not a network is named in the error."""
        with pytest.raises(ConfigError) as info:
            Config(trusted_proxies=("10.0.0.0/8", entry))
        assert f"trusted_proxies entry {entry!r} is not a network" in str(info.value)
        assert info.value.field == "trusted_proxies"

    def test_a_string_in_code_is_refused(self):
        """A bare string in code is refused rather than read one character at a time."""
        with pytest.raises(ConfigError, match="trusted_proxies must be a sequence of networks"):
            Config(trusted_proxies="10.0.0.0/8")  # type: ignore[arg-type]

    def test_comma_separated_from_the_environment(self):
        """KITE_TRUSTED_PROXIES takes networks separated by commas."""
        config = Config.load(env={"KITE_TRUSTED_PROXIES": "10.0.0.0/8, 172.16.0.0/12,"})
        assert config.trusted_proxies == ("10.0.0.0/8", "172.16.0.0/12")

    @pytest.mark.parametrize(
        ("name", "text"),
        [
            ("kite.yml", "trusted_proxies:\n  - 10.0.0.0/8\n  - fd00::/8\n"),
            ("kite.toml", 'trusted_proxies = ["10.0.0.0/8", "fd00::/8"]\n'),
        ],
    )
    def test_list_in_a_file(self, tmp_path, name, text):
        """A YAML or TOML list is read as the networks."""
        config = Config.load(file=write(tmp_path, name, text), env={})
        assert config.trusted_proxies == ("10.0.0.0/8", "fd00::/8")

    def test_bad_entry_names_the_source(self):
        """A bad network from the environment names the entry and the variable."""
        with pytest.raises(ConfigError) as info:
            Config.load(env={"KITE_TRUSTED_PROXIES": "10.0.0.0/8,nonsense"})
        assert "trusted_proxies entry 'nonsense' is not a network" in str(info.value)
        assert str(info.value).endswith("(from KITE_TRUSTED_PROXIES)")


class TestNewSettingsFromOutside:
    def test_workers_auto_is_the_cpu_count(self):
        """workers accepts auto, one worker per CPU."""
        assert Config.load(env={"KITE_WORKERS": "auto"}).workers == (os.cpu_count() or 1)
        assert Config.load(env={}, flags={"workers": "AUTO"}).workers == (os.cpu_count() or 1)

    def test_workers_that_is_neither_a_number_nor_auto(self):
        """A workers value that is neither an integer nor auto says both forms."""
        with pytest.raises(ConfigError) as info:
            Config.load(env={"KITE_WORKERS": "many"})
        assert str(info.value) == (
            "workers must be an integer or auto, got 'many' (from KITE_WORKERS)"
        )

    def test_drain_time_takes_a_duration_and_may_be_emptied(self, tmp_path):
        """drain_time is a duration; empty in a file puts it back to unset."""
        assert Config.load(env={"KITE_DRAIN_TIME": "500ms"}).drain_time == 0.5
        path = write(tmp_path, "kite.yml", "drain_time:\n")
        assert Config.load(base=Config(drain_time=2.0), file=path, env={}).drain_time is None

    def test_booleans_and_durations_of_the_new_settings(self):
        """enforce_rpc_timeout, worker_timeout and the debug limits are read from KITE_ names."""
        config = Config.load(
            env={
                "KITE_ENFORCE_RPC_TIMEOUT": "true",
                "KITE_WORKER_TIMEOUT": "1m",
                "KITE_DEBUG_MAX_CONNECTIONS": "4",
                "KITE_DEBUG_IDLE_TIMEOUT": "2s",
            }
        )
        assert config.enforce_rpc_timeout is True
        assert config.worker_timeout == 60.0
        assert (config.debug_max_connections, config.debug_idle_timeout) == (4, 2.0)

    def test_a_worker_flag_out_of_range_names_the_flag(self):
        """A workers flag out of range names --workers, the flag's long name."""
        with pytest.raises(ConfigError, match=r"between 1 and 1024, got 0 \(from --workers\)"):
            Config.load(env={}, flags={"workers": "0"})


class TestLayering:
    BASE = Config(
        port=1000, cluster="from-base", limit_qps=1, service_name="from-base", idle_timeout=1.0
    )

    @pytest.mark.parametrize(
        ("name", "text"),
        [
            (
                "kite.yml",
                """
                port: 2000
                cluster: from-file
                limit_qps: 2
                idle_timeout: 2
                """,
            ),
            (
                "kite.toml",
                """
                port = 2000
                cluster = "from-file"
                limit_qps = 2
                idle_timeout = 2
                """,
            ),
        ],
    )
    def test_flags_beat_env_beat_file_beat_base_beat_defaults(self, tmp_path, name, text):
        """Each source overrides the ones below it, field by field."""
        path = write(tmp_path, name, text)
        config = Config.load(
            base=self.BASE,
            file=path,
            env={"KITE_PORT": "3000", "KITE_CLUSTER": "from-env", "KITE_IDLE_TIMEOUT": "3"},
            flags={"port": "4000", "idle_timeout": None},
        )
        assert config.port == 4000  # flag over env, file, base
        assert config.cluster == "from-env"  # env over file, base
        assert config.idle_timeout == 3.0  # a None flag is no flag
        assert config.limit_qps == 2  # file over base
        assert config.service_name == "from-base"  # base over default
        assert config.backlog == 4096  # default: what a Go listener asks for (somaxconn)

    def test_no_sources_gives_the_base(self):
        """With an empty environment and no file or flags, load returns the base values."""
        assert Config.load(base=self.BASE, env={}) == self.BASE
        assert Config.load(env={}) == Config()

    def test_empty_env_value_is_unset(self):
        """An empty KITE_ variable is treated as unset."""
        assert Config.load(env={"KITE_PORT": ""}).port == 8888

    def test_typed_flags_are_accepted(self):
        """Flags given as Python values (not strings) are taken as they are."""
        config = Config.load(
            env={}, flags={"port": 0, "access_log": True, "read_write_timeout": 0.5}
        )
        assert (config.port, config.access_log, config.read_write_timeout) == (0, True, 0.5)

    def test_endpoint_limits_from_env(self):
        """KITE_ENDPOINT_QPS_LIMITS takes method=qps pairs."""
        config = Config.load(env={"KITE_ENDPOINT_QPS_LIMITS": "echo=10, add=20"})
        assert dict(config.endpoint_qps_limits) == {"echo": 10, "add": 20}

    def test_malformed_endpoint_limits_from_env(self):
        """A malformed pair list names the variable and the expected form."""
        with pytest.raises(
            ConfigError, match=r"method=qps pairs.*\(from KITE_ENDPOINT_QPS_LIMITS\)"
        ):
            Config.load(env={"KITE_ENDPOINT_QPS_LIMITS": "echo:10"})


class TestKiteAliases:
    def test_kite_environment_variables(self):
        """kite's KITE_SERVICE_PORT, SERVICE_CLUSTER and SERVICE_MESH_INGRESS_ADDR are read."""
        config = Config.load(
            env={
                "KITE_SERVICE_PORT": "9100",
                "SERVICE_CLUSTER": "kite-cluster",
                "SERVICE_MESH_INGRESS_ADDR": "127.0.0.1:9200",
                "KITE_SERVICE_ADDR": "127.0.0.2",
            }
        )
        assert config.port == 9100
        assert config.cluster == "kite-cluster"
        assert config.service_mesh_ingress_addr == "127.0.0.1:9200"
        assert config.host == "127.0.0.2"

    def test_canonical_name_beats_alias(self):
        """KITE_PORT wins over kite's KITE_SERVICE_PORT when both are set."""
        assert Config.load(env={"KITE_SERVICE_PORT": "9100", "KITE_PORT": "9300"}).port == 9300

    def test_kite_config_file_variable(self, tmp_path):
        """KITE_CONFIG_FILE names the file when none is passed."""
        path = write(tmp_path, "kite.yml", "port: 9400\n")
        assert Config.load(env={"KITE_CONFIG_FILE": str(path)}).port == 9400

    def test_explicit_file_beats_kite_config_file(self, tmp_path):
        """A file passed in wins over the one KITE_CONFIG_FILE names."""
        named = write(tmp_path, "named.yml", "port: 9400\n")
        given = write(tmp_path, "given.yml", "port: 9500\n")
        assert Config.load(file=given, env={"KITE_CONFIG_FILE": str(named)}).port == 9500

    def test_kite_camel_case_yaml_keys(self, tmp_path):
        """kite.yml's CamelCase keys (ServicePort, LimitQPS, ReadWriteTimeout...) are understood."""
        path = write(
            tmp_path,
            "kite.yml",
            """
            ServicePort: 9600
            ServiceCluster: camel
            QPSLimit: 300
            LimitConn: 40
            ReadWriteTimeout: 500ms
            GetRealIP: false
            EnableDebug: false
            """,
        )
        config = Config.load(file=path, env={})
        assert config.port == 9600
        assert config.cluster == "camel"
        assert config.limit_qps == 300
        assert config.limit_connections == 40
        assert config.read_write_timeout == 0.5
        assert config.get_real_ip is False
        assert config.enable_debug_server is False

    def test_unknown_file_key_is_rejected_with_the_nearest_setting(self, tmp_path):
        """A key the loader does not know is an error naming the key, the file and the setting
        it most resembles, not the list of every setting."""
        path = write(tmp_path, "kite.yml", "port: 9000\nprot: 9001\n")
        with pytest.raises(ConfigError) as info:
            Config.load(file=path, env={})
        assert str(info.value) == (
            f"unknown setting 'prot' in config file {path}; did you mean 'port'?"
        )

    def test_unknown_camel_case_key_suggests_the_field(self, tmp_path):
        """A misspelt kite-style key suggests the field it most resembles."""
        path = write(tmp_path, "kite.yml", "ReadWriteTimeot: 1s\n")
        with pytest.raises(ConfigError, match="did you mean 'read_write_timeout'"):
            Config.load(file=path, env={})

    def test_unknown_key_with_nothing_near(self, tmp_path):
        """A key like no setting points at --help instead of listing every setting."""
        path = write(tmp_path, "kite.yml", "colour: blue\n")
        with pytest.raises(ConfigError) as info:
            Config.load(file=path, env={})
        message = str(info.value)
        assert "unknown setting 'colour'" in message
        assert "--help lists the settings" in message
        assert "limit_qps" not in message

    def test_unknown_flag_is_rejected(self):
        """A flag naming no setting is an error naming it and the nearest setting."""
        with pytest.raises(ConfigError) as info:
            Config.load(env={}, flags={"prot": "1"})
        assert str(info.value) == "unknown setting 'prot'; did you mean 'port'? (from --prot)"

    def test_unknown_kite_variables_are_not_errors(self):
        """KITE_ variables that name no setting are left alone: they may be kite's own."""
        assert Config.load(env={"KITE_PROT": "1", "KITE_SOMETHING": "x"}) == Config()

    @pytest.mark.parametrize(
        ("name", "text", "expected"),
        [
            ("kite.ini", "port=1\n", "must end in .yml, .yaml or .toml"),
            ("kite.yml", "port: [1\n", "is not valid YAML at line 2, column 1: "),
            ("kite.toml", "port = \n", "is not valid TOML at line 1, column 8: Invalid value"),
            ("kite.yml", "- port\n", "must hold a mapping of settings, got list"),
        ],
    )
    def test_bad_file_is_a_clear_error(self, tmp_path, name, text, expected):
        """A file of the wrong kind or malformed says so and names the file."""
        path = write(tmp_path, name, text)
        with pytest.raises(ConfigError, match=expected) as info:
            Config.load(file=path, env={})
        assert str(path) in str(info.value)

    def test_yaml_error_does_not_name_pyyaml_s_stream(self, tmp_path):
        """PyYAML's "<unicode string>" never reaches the message; the file's path does."""
        path = write(tmp_path, "kite.yaml", "port: 1\n  host: x\n")
        with pytest.raises(ConfigError) as info:
            Config.load(file=path, env={})
        assert str(info.value).startswith(f"config file {path} is not valid YAML at line 2")
        assert "<unicode string>" not in str(info.value)

    def test_file_that_is_not_utf8(self, tmp_path):
        """A file that is not UTF-8 is a ConfigError naming the file, not a UnicodeDecodeError."""
        path = tmp_path / "kite.yml"
        path.write_bytes(b"port: 1\nservice_name: \xff\n")
        with pytest.raises(ConfigError, match="is not UTF-8 text") as info:
            Config.load(file=path, env={})
        assert str(path) in str(info.value)

    def test_missing_file_is_a_clear_error(self, tmp_path):
        """A config file that does not exist is an error naming it."""
        path = tmp_path / "missing.yml"
        with pytest.raises(ConfigError, match="cannot read config file") as info:
            Config.load(file=path, env={})
        assert str(path) in str(info.value)


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("500ms", 0.5), ("3s", 3.0), ("2.5", 2.5), ("1m", 60.0), ("250us", 0.00025), (" 7 ", 7.0)],
    )
    def test_duration_strings(self, text, seconds):
        """Durations take Go-style units as kite's YAML did, or plain seconds."""
        config = Config.load(env={"KITE_READ_WRITE_TIMEOUT": text})
        assert config.read_write_timeout == pytest.approx(seconds)

    def test_duration_in_a_file(self, tmp_path):
        """A duration string in YAML is parsed too."""
        path = write(tmp_path, "kite.yml", 'exit_wait_time: "3s"\nidle_timeout: 1500ms\n')
        config = Config.load(file=path, env={})
        assert (config.exit_wait_time, config.idle_timeout) == (3.0, 1.5)

    def test_bad_duration_names_field_and_source(self):
        """A malformed duration names the field, the expected form and the variable."""
        with pytest.raises(ConfigError) as info:
            Config.load(env={"KITE_IDLE_TIMEOUT": "soon"})
        message = str(info.value)
        assert "idle_timeout must be a duration" in message
        assert "500ms" in message
        assert message.endswith("(from KITE_IDLE_TIMEOUT)")

    @pytest.mark.parametrize(
        ("text", "value"),
        [
            ("true", True),
            ("1", True),
            ("yes", True),
            ("ON", True),
            ("false", False),
            ("0", False),
            ("no", False),
            ("Off", False),
        ],
    )
    def test_booleans_from_env(self, text, value):
        """Booleans from the environment accept true/false, 1/0, yes/no, on/off."""
        assert Config.load(env={"KITE_ACCESS_LOG": text}).access_log is value

    def test_bad_boolean_names_source(self):
        """A value that is not a boolean names the field and the variable."""
        with pytest.raises(
            ConfigError,
            match=r"access_log must be true or false, got 'maybe' "
            r"\(from KITE_ACCESS_LOG\)",
        ):
            Config.load(env={"KITE_ACCESS_LOG": "maybe"})

    def test_bad_integer_names_source(self):
        """A value that is not an integer names the field and the variable."""
        with pytest.raises(
            ConfigError, match=r"port must be an integer, got 'http' \(from KITE_PORT\)"
        ):
            Config.load(env={"KITE_PORT": "http"})

    def test_out_of_range_names_source(self):
        """A parsed value out of range names the variable it came from."""
        with pytest.raises(ConfigError) as info:
            Config.load(env={"KITE_LIMIT_QPS": "-5"})
        assert str(info.value) == "limit_qps must be an integer >= 0, got -5 (from KITE_LIMIT_QPS)"
        assert info.value.source == "KITE_LIMIT_QPS"
        assert info.value.field == "limit_qps"

    def test_out_of_range_in_file_names_the_file(self, tmp_path):
        """A value from the config file that is out of range names the file."""
        path = write(tmp_path, "kite.yml", "port: 99999\n")
        with pytest.raises(ConfigError, match=rf"port must be .* \(from config file {path}\)"):
            Config.load(file=path, env={})

    def test_out_of_range_flag_names_the_flag(self):
        """A flag value out of range names the flag."""
        with pytest.raises(ConfigError, match=r"\(from --limit-qps\)"):
            Config.load(env={}, flags={"limit_qps": "-1"})

    def test_alias_error_names_the_alias(self):
        """An error in a kite-style variable names that variable."""
        with pytest.raises(ConfigError, match=r"\(from KITE_SERVICE_PORT\)"):
            Config.load(env={"KITE_SERVICE_PORT": "eighty"})

    def test_debug_port_may_be_emptied(self, tmp_path):
        """An empty debug_port in a file unsets the one in code (back to kite's rule)."""
        path = write(tmp_path, "kite.yml", "debug_port:\n")
        assert Config.load(base=Config(debug_port=5), file=path, env={}).debug_port is None


class TestDebugPort:
    @pytest.mark.parametrize(
        ("service_port", "debug_port"),
        [
            (8888, 18888),
            (80, 10080),
            (9999, 19999),
            (10000, 20000),
            (55535, 65535),
            (55536, 45536),
            (65000, 55000),
            (65535, 55535),
            (0, 0),
        ],
    )
    def test_derived_rule(self, service_port, debug_port):
        """The debug port is the service port + 10000, or - 10000 where that is past 65535
        (never a random port for a fixed service port); 0 (a free port) for port 0."""
        assert Config().effective_debug_port(service_port) == debug_port

    def test_explicit_debug_port_wins(self):
        """A debug_port that is set is used as it is."""
        assert Config(debug_port=9999).effective_debug_port(8888) == 9999
        assert Config(debug_port=0).effective_debug_port(8888) == 0


class TestEnvironmentVariables:
    def test_every_field_has_a_kite_variable(self):
        """Every setting can be set from a KITE_ variable, and the kite aliases are listed."""
        names = Config.env_variables()
        for field in dataclasses.fields(Config):
            assert names[f"KITE_{field.name.upper()}"] == field.name
        for alias in (
            "KITE_SERVICE_PORT",
            "SERVICE_CLUSTER",
            "SERVICE_MESH_INGRESS_ADDR",
            "KITE_CONFIG_FILE",
        ):
            assert alias in names


class TestHelpFromMetadata:
    """--help is generated from each field's own metadata; nothing is written twice."""

    def test_every_field_documents_itself(self):
        """Each field has a help line and a known group in its metadata."""
        for field in dataclasses.fields(Config):
            doc = field.metadata["doc"]
            assert doc.help, field.name
            assert doc.group in GROUPS, field.name

    def test_default_is_read_from_the_field(self):
        """The default shown is the field's own default, with the variables that set it."""
        (field,) = [f for f in dataclasses.fields(Config) if f.name == "limit_qps"]
        assert help_line(field) == (
            "most requests per second, server-wide "
            f"(default: {DEFAULT_LIMIT_QPS}) [env KITE_LIMIT_QPS]"
        )

    def test_defaults_that_mean_something_else_say_what(self):
        """An empty or None default that stands for a derived value says what it becomes."""
        fields = {f.name: f for f in dataclasses.fields(Config)}
        assert f"(default: {DEFAULT_CONSUL_ADDR})" in help_line(fields["consul_addr"])
        assert "(default: the service port + 10000" in help_line(fields["debug_port"])
        assert f"(default: {DEFAULT_DRAIN_TIME_REGISTERED:g} when registered" in help_line(
            fields["drain_time"]
        )

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("idle_timeout", "SECONDS"),
            ("backlog", "INT"),
            ("log_level", "{debug,info,warning,error,critical}"),
            ("debug_port", "PORT"),
            ("workers", "INT|auto"),
        ],
    )
    def test_placeholders(self, name, expected):
        """Placeholders come from the field's type, its choices, or its own metadata."""
        assert placeholder(name) == expected

    def test_bools_and_text_fields_have_typed_flags(self):
        """No field falls back to an untyped VALUE placeholder."""
        for field in dataclasses.fields(Config):
            if field.type not in ("bool", bool):
                assert placeholder(field.name) != "VALUE", field.name


class TestConfigPackage:
    def test_names_other_modules_import_are_re_exported(self):
        """``from kitegreen.config import ...`` keeps working for what other modules use."""
        from kitegreen.config import DEFAULT_CONSUL_ADDR as addr
        from kitegreen.config import Config as config_class

        assert config_class is Config
        assert addr == "127.0.0.1:8500"


class TestPublicApi:
    def test_all_is_sorted(self):
        """kitegreen.__all__ is sorted."""
        assert kitegreen.__all__ == sorted(kitegreen.__all__)

    def test_all_matches_the_module(self):
        """__all__ lists exactly the public names the package exports, and each exists."""
        exported = {
            name
            for name, value in vars(kitegreen).items()
            if not name.startswith("_")
            and not inspect.ismodule(value)
            and not isinstance(value, __future__._Feature)
        }
        assert set(kitegreen.__all__) == exported | {"__version__"}
        for name in kitegreen.__all__:
            assert hasattr(kitegreen, name), name

    def test_star_import_gives_all(self):
        """``from kitegreen import *`` brings in exactly __all__."""
        namespace: dict[str, object] = {}
        exec("from kitegreen import *", namespace)
        namespace.pop("__builtins__")
        assert sorted(namespace) == sorted(kitegreen.__all__)

    def test_exceptions_share_one_root(self):
        """Every exception kitegreen exports derives from KitegreenError."""
        for name in kitegreen.__all__:
            value = getattr(kitegreen, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                assert issubclass(value, kitegreen.KitegreenError), name

    @pytest.mark.slow
    def test_importing_the_package_is_lazy(self):
        """``import kitegreen`` imports neither the server nor ssl until a name is used, and
        using one name brings in the whole API."""
        code = (
            "import sys, kitegreen\n"
            "print('ssl' in sys.modules, 'kitegreen.server' in sys.modules)\n"
            "kitegreen.Config\n"
            "print('RpcServer' in vars(kitegreen), 'kitegreen.server' in sys.modules)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
        )
        assert result.stdout.split() == ["False", "False", "True", "True"]

    def test_dir_lists_the_api_before_it_is_loaded(self):
        """dir(kitegreen) shows every exported name, loaded or not."""
        assert set(kitegreen.__all__) <= set(dir(kitegreen))

    def test_unknown_name_is_an_attribute_error(self):
        """A name the package does not export raises AttributeError, as for any module."""
        with pytest.raises(AttributeError, match="no attribute 'Nope'"):
            kitegreen.Nope  # noqa: B018
