"""``--interceptor SPEC``: a SPEC may call only a marked factory, and runs nothing else.

A SPEC is text from a command line or an environment variable; ``name(ARGS)`` must not be a
way to call any function of any module. These run the real ``uproxy`` command (no root
needed: the SPEC is refused, or the marked factory loaded, before anything is bound) and the
loader itself on files written here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cli_tools import run_uproxy

from uproxy_cli._spec import SpecError, load_interceptor
from uproxy_trio import Direction, Flow

FLOW = Flow(1, ("192.0.2.2", 40000), ("198.51.100.2", 9090))

USER_FILE = """\
from pathlib import Path

from uproxy_trio import interceptor_factory


@interceptor_factory
def repeat(times, separator=b""):
    async def repeat_chunks(flow, direction, chunks):
        async for chunk in chunks:
            yield separator.join([chunk] * times)

    return repeat_chunks


def unmarked(path):
    Path(path).touch()

    async def nothing(flow, direction, chunks):
        async for chunk in chunks:
            yield chunk

    return nothing


async def plain(flow, direction, chunks):
    async for chunk in chunks:
        yield chunk.upper()
"""


@pytest.mark.parametrize(
    "spec",
    [
        'os:system("touch {file}")',
        "subprocess:run(['touch', '{file}'])",
        "builtins:exec(\"open('{file}', 'w')\")",
        "pathlib:Path('{file}')",
    ],
)
def test_a_spec_that_names_an_unmarked_callable_is_refused_before_running(
    tmp_path: Path, spec: str
) -> None:
    file = tmp_path / "was-run"
    done = run_uproxy("serve", "--interceptor", spec.format(file=file), timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("uproxy: error: Invalid value for '--interceptor': ")
    assert "is not marked @uproxy_trio.interceptor_factory, so it is not called" in lines[0]
    assert not file.exists()


@pytest.mark.parametrize(
    "arguments",
    [
        '(b"a", b"b") or __import__("os").system("touch {file}")',
        '(b"a", b"b") if 1 else 2',
        '(b"a", b"b"), ("{file}")',
        '(b"a")(b"x", b"y")',
        '(b"a", b"b")#)',
    ],
)
def test_the_parentheses_hold_one_call_of_literals_and_end_the_spec(
    tmp_path: Path, arguments: str
) -> None:
    """Whatever follows the factory's name is read as one argument list that ends the SPEC:
    anything around or after it is refused in one line (no traceback), never dropped."""
    file = tmp_path / "was-run"
    spec = "uproxy_trio.interceptors:replace" + arguments.format(file=file)
    done = run_uproxy("serve", "--interceptor", spec, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"uproxy: error: Invalid value for '--interceptor': {spec!r}: the arguments must be "
        "one (...) of Python literals at the end of the SPEC"
    ]
    assert not file.exists()


def test_an_unmarked_factory_in_a_user_file_is_not_called(tmp_path: Path) -> None:
    source = tmp_path / "mine.py"
    source.write_text(USER_FILE)
    file = tmp_path / "was-run"
    with pytest.raises(SpecError, match="unmarked is not marked"):
        load_interceptor(f"{source}:unmarked({str(file)!r})")
    assert not file.exists()


async def run_chunks(spec: str, chunks: list[bytes]) -> list[bytes]:
    interceptor = load_interceptor(spec)

    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    out = interceptor(FLOW, Direction.CLIENT_TO_SERVER, source())
    return [chunk async for chunk in out]


async def test_a_marked_factory_in_a_user_file_is_called_with_its_literal_arguments(
    tmp_path: Path,
) -> None:
    source = tmp_path / "mine.py"
    source.write_text(USER_FILE)
    assert await run_chunks(f'{source}:repeat(2, separator=b"|")', [b"ab", b"c"]) == [
        b"ab|ab",
        b"c|c",
    ]
    # A plain async generator function is an interceptor as it is, without arguments.
    assert await run_chunks(f"{source}:plain", [b"ab"]) == [b"AB"]
    # A marked factory named without arguments is not an interceptor: say how to call it.
    with pytest.raises(
        SpecError, match=r"repeat makes interceptors; call it, as .*repeat\(\.\.\.\)"
    ):
        load_interceptor(f"{source}:repeat")
    # The arguments stay literals: nothing in them is evaluated.
    with pytest.raises(SpecError, match="arguments must be Python literals"):
        load_interceptor(f"{source}:repeat(__import__('os').getpid())")


def test_the_built_in_factories_and_the_example_carry_the_mark() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "corrupt.py"
    for spec in (
        'uproxy_trio.interceptors:replace(b"a", b"b")',
        'uproxy_trio.interceptors:regex_replace(b"a+", b"b")',
        'uproxy_trio.interceptors:label("<L>")',
        "uproxy_trio.interceptors:throttle(1000)",
        "uproxy_trio.interceptors:delay(0.1)",
        "uproxy_trio.interceptors:hexdump()",
        f"{example}:corrupt_every(10)",
    ):
        assert callable(load_interceptor(spec)), spec
