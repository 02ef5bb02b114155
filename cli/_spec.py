"""Turning ``--interceptor SPEC`` into an interceptor, or into one clear reason why not.

SPEC is ``path/to/file.py:name`` or ``package.module:name``. Everything is checked before
the proxy binds a socket, so a typo never costs a running proxy its flows.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

from uproxy_trio import Interceptor


class SpecError(ValueError):
    """Why a SPEC cannot be loaded, as one line that names the SPEC."""


def load_interceptor(spec: str) -> Interceptor:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise SpecError(f"{spec!r}: expected path/to/file.py:name or package.module:name")
    module = _load_module(spec, target)
    try:
        candidate = getattr(module, name)
    except AttributeError:
        raise SpecError(f"{spec!r}: {target} has no {name!r}") from None
    if not inspect.isasyncgenfunction(candidate):
        raise SpecError(
            f"{spec!r}: {name} is not an async generator function "
            "(async def ... with yield: (flow, direction, chunks) -> AsyncIterator[bytes])"
        )
    try:
        inspect.signature(candidate).bind(None, None, None)
    except TypeError:
        raise SpecError(
            f"{spec!r}: {name} must take three arguments (flow, direction, chunks)"
        ) from None
    interceptor: Interceptor = candidate
    return interceptor


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
    # A name of its own per file, so two interceptor files called handlers.py do not collide.
    module_name = f"uproxy_interceptor_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"{spec!r}: {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    return module
