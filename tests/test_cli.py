"""Bad input to ``uproxy``: one clear line and exit code 2, never a traceback (no root needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import typer
from cli_tools import run_uproxy

from uproxy_cli._app import app as uproxy_app


def test_version() -> None:
    done = run_uproxy("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("uproxy 0.")


def test_help_shows_serve_options() -> None:
    done = run_uproxy("serve", "--help")
    assert done.returncode == 0
    for option in ("--listen", "--connect-timeout", "--label", "--interceptor", "--config"):
        assert option in done.stdout


def help_rows(help_text: str) -> dict[str, str]:
    """Each option's row of a help panel, its wrapped lines joined: ``{"--mark": "..."}``."""
    rows: dict[str, str] = {}
    name = ""
    for line in help_text.splitlines():
        cells = line.strip("│ ").split()
        if line.startswith("│ --"):
            name = cells[0]
            rows[name] = ""
        if name and line.startswith("│"):
            rows[name] += " " + " ".join(cells)
    return rows


def wide_help(*command: str) -> subprocess.CompletedProcess[str]:
    """``--help`` wide enough that no option's help wraps into another's row."""
    done = run_uproxy(*command, "--help", env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done


def test_rules_help_shows_every_default_and_none_for_interfaces_or_ports() -> None:
    done = wide_help("rules")
    options = help_rows(done.stdout)
    assert "[default: nft]" in options["--backend"]
    assert "[default: (127.0.0.1:9091)]" in options["--listen"]
    assert "[default: 1]" in options["--mark"]
    assert "[default: 100]" in options["--table"]
    for name in ("--in-interface", "--out-interface", "--port"):
        assert "default" not in options[name], options[name]
    assert "ens6" not in done.stdout
    assert "9090" not in done.stdout


@pytest.mark.parametrize(
    ("command", "flags", "choices"),
    [
        ([], ["--version", "--help"], {}),
        (
            ["serve"],
            ["--help"],
            {"--log-level": "[debug|info|warning|error]", "--log-format": "[text|json]"},
        ),
        (["rules"], ["--apply", "--remove", "--help"], {"--backend": "[nft|iptables]"}),
        (["demo"], ["--wait", "--help"], {}),
        (
            ["bench"],
            ["--uproxy-syn-to-tproxy", "--json", "--help"],
            {"--relay": "[kernel|haproxy|uproxy|uproxy-default-logging|uproxy-identity]"},
        ),
        (["lab", "up"], ["--help"], {}),
        (["flows"], ["--json", "--help"], {}),
    ],
)
def test_help_shows_flags_bare_and_the_choices_of_an_option(
    command: list[str], flags: list[str], choices: dict[str, str]
) -> None:
    """A flag takes no value, so nothing follows it; an option that takes one of a few words
    lists them, as the user types them."""
    done = wide_help(*command)
    assert "<bool>" not in done.stdout
    assert "<str>" not in done.stdout
    rows = help_rows(done.stdout)
    for flag in flags:
        # The help text follows the flag directly, with no value between them.
        assert rows[flag].split()[1][0].isupper(), rows[flag]
    for option, metavar in choices.items():
        assert metavar in rows[option].split(), rows[option]


def _commands(group: typer.core.TyperGroup, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*path, name))
        if isinstance(command, typer.core.TyperGroup):
            found += _commands(command, (*path, name))
    return found


def test_every_usage_line_brackets_each_argument_once() -> None:
    """Typer brackets an optional argument itself: a metavar of ``[NAME]`` showed
    ``[[NAME]]``."""
    app = typer.main.get_command(uproxy_app)
    assert isinstance(app, typer.core.TyperGroup)
    commands = _commands(app)
    assert ("lab", "down") in commands
    assert ("toxic", "list") in commands
    for command in commands:
        usage = next(
            line for line in run_uproxy(*command, "--help").stdout.splitlines() if "Usage:" in line
        )
        for doubled in ("[[", "]]", "{[", "]}"):
            assert doubled not in usage, (command, usage)


def test_serve_help_shows_the_defaults_that_are_not_values() -> None:
    options = help_rows(wide_help("serve").stdout)
    assert "[default: (127.0.0.1:9091; none with --forward or --control)]" in options["--listen"]
    assert "[default: (off)]" in options["--control"]
    assert "[default: (random)]" in options["--seed"]
    assert "[default: (off)]" in options["--idle-timeout"]
    assert "[default: (the user's own)]" in options["--group"]
    assert "[default: 10.0]" in options["--connect-timeout"]
    # What the default level writes: the access-log line, not every step of a flow.
    assert "info: one line per flow, at its close;" in options["--log-level"]


BAD_SPEC_FILE = "async def not_a_generator(flow, direction, chunks):\n    return chunks\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["serve", "--listen", "nonsense"],
            "Invalid value for '--listen': 'nonsense' is not HOST:PORT",
        ),
        (["serve", "--listen", "127.0.0.1:70000"], "port 70000 is out of range (1-65535)"),
        (["serve", "--listen", "localhost:9091"], "'localhost' is not an IP address"),
        (["serve", "--frobnicate"], "No such option: --frobnicate"),
        (["serve", "--connect-timeout", "soon"], "'--connect-timeout'"),
        (["serve", "--log-level", "loud"], "'loud' is not one of debug, info, warning, error"),
        (["serve", "--source-port", "random"], "'random' is not one of keep, ephemeral"),
        (["serve", "-i", "missing.py:f"], "'missing.py:f': no such file 'missing.py'"),
        (["serve", "-i", "no_such_module_xyz:f"], "no module named 'no_such_module_xyz'"),
        (["serve", "-i", "uproxy_trio:nothing"], "uproxy_trio has no 'nothing'"),
        (["serve", "-i", "uproxy_trio.interceptors:label"], "label makes interceptors; call it"),
        (
            ["serve", "-i", "uproxy_trio.interceptors:label(1, 2, 3)"],
            "label(...) failed: TypeError",
        ),
        (["serve", "-i", "uproxy_trio.interceptors:replace(open(1))"], "must be Python literals"),
        (
            ["serve", "-i", 'uproxy_trio.interceptors:replace(b"", b"x")'],
            "needs a non-empty pattern",
        ),
        (["serve", "-i", "justtext"], "expected path/to/file.py:name, package.module:name"),
        (["bogus-command"], "No such command 'bogus-command'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = run_uproxy(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("uproxy: error: ")
    assert message in lines[0]


def test_interceptor_of_the_wrong_kind_is_refused_before_binding(tmp_path: Path) -> None:
    spec_file = tmp_path / "wrong.py"
    spec_file.write_text(BAD_SPEC_FILE)
    done = run_uproxy("serve", "-i", f"{spec_file}:not_a_generator")
    assert done.returncode == 2
    assert "not_a_generator is not an async generator function" in done.stderr
    spec_file.write_text(
        "async def two(flow, chunks):\n    yield b''\n"
        "async def fine(flow, direction, chunks):\n    yield b''\n"
    )
    done = run_uproxy("serve", "-i", f"{spec_file}:two")
    assert done.returncode == 2
    assert "two must take three arguments (flow, direction, chunks)" in done.stderr
    done = run_uproxy("serve", "-i", f"{spec_file}:fine", "-i", f"{spec_file}:nope")
    assert done.returncode == 2
    assert f"{spec_file}:nope': {spec_file} has no 'nope'" in done.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    done = run_uproxy("serve", "-i", f"{broken}:f")
    assert done.returncode == 2
    assert "loading failed: SyntaxError" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("command", "env_vars"),
    [
        (["serve"], ["UPROXY_LISTEN", "UPROXY_CONNECT_TIMEOUT", "UPROXY_LOG_LEVEL"]),
        (["rules"], ["UPROXY_BACKEND", "UPROXY_PORT", "UPROXY_LISTEN", "UPROXY_MARK"]),
        (["check"], ["UPROXY_LISTEN", "UPROXY_MARK", "UPROXY_TABLE"]),
        (["demo"], ["UPROXY_DEMO_WAIT"]),
        (["lab", "up"], []),
        (["lab", "down"], []),
        (["lab", "status"], []),
    ],
)
def test_every_command_has_help_with_an_example(command: list[str], env_vars: list[str]) -> None:
    done = run_uproxy(*command, "--help")
    assert done.returncode == 0
    assert "Example" in done.stdout
    assert f"uproxy {' '.join(command)}" in done.stdout
    for name in env_vars:
        assert name in done.stdout


def test_rules_options_come_from_the_environment() -> None:
    done = run_uproxy(
        "rules",
        env={
            "UPROXY_BACKEND": "iptables",
            "UPROXY_IN_INTERFACE": "ens6",
            "UPROXY_OUT_INTERFACE": "ens7",
            "UPROXY_PORT": "8080",
            "COLUMNS": "200",
        },
    )
    assert done.returncode == 0, done.stderr
    assert "-A UPROXY_PREROUTING -i ens6 -p tcp --dport 8080 " in done.stdout
