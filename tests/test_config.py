"""``uproxy serve --config FILE.toml`` without a lab: what a file may say, and how a bad one
is refused (one line naming the file and the key, exit 2, before anything is bound)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from cli_tools import run_uproxy

from uproxy_cli._app import app
from uproxy_cli._config import OPTIONS, ConfigError, read_config
from uproxy_trio import Forward, Route

ROOT = Path(__file__).resolve().parent.parent


def readme_config_files() -> list[str]:
    """The TOML blocks of the README's "Routes and the config file": the file's shape, then
    the example."""
    section = (ROOT / "README.md").read_text().split("### Routes and the config file")[1]
    return re.findall(r"```toml\n(.*?)```", section.split("\n### ")[0], re.DOTALL)


def written(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "uproxy.toml"
    path.write_text(text)
    return path


def test_the_files_keys_are_serves_long_options() -> None:
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    long_options = {
        param.name
        for param in serve.params
        if any(opt.startswith("--") for opt in param.opts) and param.name != "config"
    }
    assert set(OPTIONS) == long_options


def test_the_files_shape_in_the_readme_reads_as_options_and_a_route(tmp_path: Path) -> None:
    shape, _ = readme_config_files()
    config = read_config(written(tmp_path, shape))
    assert config.options == {"listen": ["127.0.0.1:9091", "[::1]:9091"], "log_level": "info"}
    (slow_db,) = config.routes
    assert isinstance(slow_db, Route)
    assert (slow_db.name, slow_db.transport, slow_db.client, slow_db.server, slow_db.port) == (
        "slow-db",
        "tcp",
        "192.0.2.0/24",
        "198.51.100.0/24",
        "5432",
    )
    assert (slow_db.idle_timeout, slow_db.connect_timeout) == (60, None)
    assert len(slow_db.interceptors) == 1
    assert config.routes.match("tcp", ("192.0.2.9", 1), ("198.51.100.7", 5432)) is slow_db
    assert config.routes.match("udp", ("192.0.2.9", 1), ("198.51.100.7", 5432)) is None


def test_the_readmes_example_routes_redis_and_one_subnets_database_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, example = readme_config_files()
    monkeypatch.chdir(ROOT)  # its SPEC names examples/redis_log.py, as a user in the repo would
    routes = read_config(written(tmp_path, example)).routes

    def taken(client: str, port: int) -> str | None:
        route = routes.match("tcp", (client, 40000), ("198.51.100.2", port))
        return None if route is None else route.name

    assert taken("203.0.113.5", 6379) == "redis-log"
    assert taken("192.0.2.2", 5432) == "slow-db"
    assert taken("203.0.113.5", 5432) is None
    assert taken("192.0.2.2", 9090) is None


def test_a_file_without_routes_has_an_empty_table(tmp_path: Path) -> None:
    assert len(read_config(written(tmp_path, 'log_level = "debug"\n')).routes) == 0


BAD_FILES = [
    ('listen = "127.0.0.1:9091"', "listen: '127.0.0.1:9091' is not a list of strings"),
    ('listen = ["nonsense"]', "listen: 'nonsense' is not HOST:PORT"),
    (
        "frobnicate = 1",
        "frobnicate: unknown key (the keys are connect_timeout, control, forward, forwards, grace",
    ),
    ('log_level = "loud"', "log_level: 'loud' is not one of debug, info, warning, error"),
    ("idle_timeout = 0", "idle_timeout: 0 is not a number of seconds of at least 0.001"),
    ('connect_timeout = "soon"', "connect_timeout: 'soon' is not a number of seconds"),
    ("max_flows = true", "max_flows: True is not a whole number of at least 1"),
    ("workers = 0", "workers: 0 is not a whole number of at least 1"),
    ('source_port = "random"', "source_port: 'random' is not one of keep, ephemeral"),
    ('metrics = "nowhere"', "metrics: 'nowhere' is not HOST:PORT"),
    ('control = "nowhere"', "control: 'nowhere' is not HOST:PORT"),
    ('control = "unix:"', "control: 'unix:': unix: needs a path"),
    ('control = "127.0.0.1:8474"\nworkers = 2', "control: --control works with one worker only"),
    ('forward = ["127.0.0.1:1"]', "forward: '127.0.0.1:1': expected LISTEN=UPSTREAM"),
    ('forward = ["127.0.0.1:1=127.0.0.1:2"]\nworkers = 2', "forward: --forward works with one"),
    ('seed = "x"', "seed: 'x' is not a whole number"),
    ('udp_gso = "no"', "udp_gso: 'no' is not one of on, off"),
    ("udp_gso = false", "udp_gso: False is not a string"),
    ("forwards = 1", "forwards: not an array of tables (write [[forwards]])"),
    ('[[forwards]]\nlisten = "127.0.0.1:1"', "[[forwards]] #1: upstream: missing"),
    (
        '[[forwards]]\nlisten = "127.0.0.1:1"\nupstream = "db:5432"',
        "[[forwards]] #1: 'db:5432': 'db' is not an IP address",
    ),
    (
        '[[forwards]]\nname = "db"\nlisten = "127.0.0.1:1"\nupstream = "127.0.0.1:2"\n'
        '[[routes]]\nname = "db"',
        "[[forwards]] #1 'db': name: a route or forward is named 'db'",
    ),
    ('interceptor = ["missing.py:f"]', "interceptor: 'missing.py:f': no such file 'missing.py'"),
    ('group = "root"', "group: --group needs --user"),
    ("listen = [1", "not TOML: "),
    ("routes = 3", "routes: not an array of tables (write [[routes]])"),
    ("[[routes]]\nport = 5432", "[[routes]] #1: name: missing (every route has a name)"),
    ('[[routes]]\nname = "two words"', "[[routes]] #1 'two words': name: 'two words' must be"),
    ('[[routes]]\nname = "db"\nport = 70000', "[[routes]] #1 'db': port: '70000': port 70000 is"),
    ('[[routes]]\nname = "db"\nport = "x"', "[[routes]] #1 'db': port: 'x' is not a port"),
    ('[[routes]]\nname = "db"\nport = 1.5', "[[routes]] #1 'db': port: 1.5 is not a port"),
    (
        '[[routes]]\nname = "db"\nclient = "192.0.2.1/24"',
        "[[routes]] #1 'db': client: '192.0.2.1/24' has host bits set",
    ),
    (
        '[[routes]]\nname = "db"\nserver = "db.lan"',
        "[[routes]] #1 'db': server: 'db.lan' is not a network",
    ),
    (
        '[[routes]]\nname = "db"\ntransport = "sctp"',
        "[[routes]] #1 'db': transport: 'sctp' is not one of",
    ),
    (
        '[[routes]]\nname = "db"\nidle_timeout = -1',
        "[[routes]] #1 'db': idle_timeout: -1 is not a number",
    ),
    (
        '[[routes]]\nname = "db"\ninterceptors = "x"',
        "[[routes]] #1 'db': interceptors: 'x' is not a list",
    ),
    ('[[routes]]\nname = "db"\ncolour = "red"', "[[routes]] #1 'db': colour: unknown key"),
    (
        '[[routes]]\nname = "db"\n[[routes]]\nname = "db"',
        "[[routes]] #2 'db': name: another route is named 'db'",
    ),
    (
        '[[routes]]\nname = "db"\ninterceptors = [\'os:system("touch /tmp/pwned")\']',
        "[[routes]] #1 'db': interceptors: 'os:system(\"touch /tmp/pwned\")': system is not marked",
    ),
    (
        '[[routes]]\nname = "db"\ninterceptors = ["no_such_module_xyz:f"]',
        "[[routes]] #1 'db': interceptors: 'no_such_module_xyz:f': no module named",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key_and_exit_2(
    tmp_path: Path, text: str, message: str
) -> None:
    path = written(tmp_path, text)
    done = run_uproxy("serve", "--config", str(path))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"uproxy: error: {path}: {message}"), lines[0]
    assert not Path("/tmp/pwned").exists()


def test_a_missing_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run_uproxy("serve", "--config", str(tmp_path / "nowhere.toml"))
    assert done.returncode == 2
    assert done.stderr == f"uproxy: error: {tmp_path / 'nowhere.toml'}: no such file\n"


def test_a_value_given_on_the_command_line_is_checked_there_not_in_the_file(
    tmp_path: Path,
) -> None:
    # The file's log_level is overridden, so the command line's bad value is what is reported.
    path = written(tmp_path, 'log_level = "info"\n')
    done = run_uproxy("serve", "--config", str(path), "--log-level", "loud")
    assert done.returncode == 2
    assert done.stderr.startswith("uproxy: error: Invalid value for '--log-level': 'loud'")


def test_read_config_raises_one_error_that_names_the_file(tmp_path: Path) -> None:
    path = written(tmp_path, '[[routes]]\nname = "a"\nport = "9-1"\n')
    with pytest.raises(ConfigError, match=r"uproxy\.toml: \[\[routes\]\] #1 'a': port: '9-1'"):
        read_config(path)


def test_the_readmes_forward_table_reads_as_a_named_forward(tmp_path: Path) -> None:
    section = (ROOT / "README.md").read_text().split("## Faults on live flows")[1]
    (text,) = re.findall(r"```toml\n(.*?)```", section.split("\n## ")[0], re.DOTALL)
    config = read_config(written(tmp_path, text))
    assert config.options == {"control": "127.0.0.1:8474"}
    assert config.forwards == (Forward("redis", ("127.0.0.1", 26379), ("127.0.0.1", 6379)),)


def test_a_forward_is_named_by_its_listen_text_unless_named_and_loads_its_interceptors(
    tmp_path: Path,
) -> None:
    text = (
        '[[forwards]]\nlisten = "[::1]:7001"\nupstream = "[::1]:7000"\n'
        "interceptors = ['uproxy_trio.toxics:latency(latency=5)']\n"
    )
    (forward,) = read_config(written(tmp_path, text)).forwards
    assert (forward.name, forward.listen, forward.upstream) == (
        "[::1]:7001",
        ("::1", 7001),
        ("::1", 7000),
    )
    assert len(forward.interceptors) == 1
