"""Turning ``--interceptor SPEC`` into an interceptor, or into one clear reason why not.

SPEC is ``path/to/file.py:name`` or ``package.module:name``, where ``name`` is an interceptor
(an async generator function, used as it is), or ``name(ARGS)`` where ``name`` is a factory
marked with ``@uproxy_trio.interceptor_factory``, called with the literal ``ARGS`` (numbers,
strings, bytes, ... as in Python; nothing is evaluated) to make the interceptor. Whether
``name`` carries the mark is decided before anything is called, so a SPEC such as
``os:system("...")`` runs nothing. Everything is checked before the proxy binds a socket, so
a typo never costs a running proxy its flows.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from uproxy_trio import Interceptor
from uproxy_trio._interceptor import is_interceptor_factory

USAGE = "expected path/to/file.py:name, package.module:name or ...:factory(ARGS)"


class SpecError(ValueError):
    """Why a SPEC cannot be loaded, as one line that names the SPEC."""


def load_interceptor(spec: str) -> Interceptor:
    head, paren, arguments = spec.partition("(")
    target, sep, name = head.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise SpecError(f"{spec!r}: {USAGE}")
    # The arguments are checked first: a SPEC that is not literal costs no import.
    call = _literal_arguments(spec, arguments) if paren else None
    candidate = getattr(_load_module(spec, target), name, None)
    if candidate is None:
        raise SpecError(f"{spec!r}: {target} has no {name!r}")
    if call is not None:
        if not is_interceptor_factory(candidate):
            raise SpecError(
                f"{spec!r}: {name} is not marked @uproxy_trio.interceptor_factory, so it is "
                "not called (only marked factories take arguments)"
            )
        candidate = _call_factory(spec, name, candidate, *call)
    elif is_interceptor_factory(candidate):
        raise SpecError(f"{spec!r}: {name} makes interceptors; call it, as {head}(...)")
    if not inspect.isasyncgenfunction(candidate):
        raise SpecError(
            f"{spec!r}: {name} is not an async generator function "
            "(async def with yield, taking flow, direction, chunks)"
        )
    if not _takes_three(candidate):
        raise SpecError(f"{spec!r}: {name} must take three arguments (flow, direction, chunks)")
    interceptor: Interceptor = candidate
    return interceptor


def load_named(spec: str) -> Any:
    """``path/to/file.py:name`` or ``package.module:name``, the object itself: nothing is
    called (a toxic type for ``--toxic-type``, say, which its caller checks)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise SpecError(f"{spec!r}: expected path/to/file.py:name or package.module:name")
    candidate = getattr(_load_module(spec, target), name, None)
    if candidate is None:
        raise SpecError(f"{spec!r}: {target} has no {name!r}")
    return candidate


def _takes_three(candidate: Any) -> bool:
    try:
        inspect.signature(candidate).bind(None, None, None)
    except TypeError:
        return False
    return True


def _literal_arguments(spec: str, arguments: str) -> tuple[list[Any], dict[str, Any]]:
    source = f"f({arguments}"
    try:
        call = ast.parse(source, mode="eval").body
    except SyntaxError:
        call = None
    # One call of ``f`` that is the whole text: ``f(1) or g()``, ``f(1)(2)``, ``f(1), g`` and
    # ``f(1)#)`` are refused rather than read in part (an ``assert`` here let them through
    # as a traceback, or dropped what followed).
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and ast.get_source_segment(source, call) == source
    ):
        raise SpecError(
            f"{spec!r}: the arguments must be one (...) of Python literals at the end of the SPEC"
        )
    try:
        args = [ast.literal_eval(node) for node in call.args]
        kwargs = {str(kw.arg): ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
        if len(kwargs) != len(call.keywords):
            raise ValueError("**kwargs")
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{spec!r}: arguments must be Python literals ({exc})") from None
    return args, kwargs


def _call_factory(
    spec: str, name: str, factory: Any, args: list[Any], kwargs: dict[str, Any]
) -> Any:
    try:
        return factory(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a factory may reject its arguments any way
        raise SpecError(f"{spec!r}: {name}(...) failed: {type(exc).__name__}: {exc}") from None


def _load_module(spec: str, target: str) -> ModuleType:
    try:
        if target.endswith(".py") or "/" in target:
            return _load_file(spec, Path(target))
        return importlib.import_module(target)
    except SpecError:
        raise
    except ModuleNotFoundError as exc:
        raise SpecError(f"{spec!r}: no module named {exc.name!r}") from None
    except Exception as exc:  # noqa: BLE001 - user code may raise anything while importing
        raise SpecError(f"{spec!r}: loading failed: {type(exc).__name__}: {exc}") from None


def _load_file(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise SpecError(f"{spec!r}: no such file {str(path)!r}")
    resolved = str(path.resolve())
    # A module name of its own per file, so two interceptor files named handlers.py in
    # different folders do not collide, and the same file loaded twice is one module.
    module_name = "uproxy_interceptor_" + hashlib.sha1(resolved.encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"{spec!r}: {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
