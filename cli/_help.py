"""Command help laid out for the terminal: docstrings as paragraphs, options as a user types them.

Typer's rich help keeps every line break of a docstring after its first paragraph, so text
wrapped at 100 columns in the source comes out ragged at 80. Prose paragraphs are joined
into one line each here for the terminal to wrap; a paragraph that starts with ``\\b`` (click's
"do not rewrap" mark) is an example block and keeps its lines.

The option column shows what follows an option on the command line: nothing after a flag
(Typer would print ``<bool>``), the choices of an option that takes one of a few words
(``[debug|info|warning|error]``, not ``<str>``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import typer.core


def help_of(command: Callable[..., Any]) -> str:
    text = inspect.cleandoc(command.__doc__ or "")
    paragraphs = []
    for paragraph in text.split("\n\n"):
        if paragraph.startswith("\b\n"):
            paragraphs.append(paragraph.removeprefix("\b\n"))
        else:
            paragraphs.append(" ".join(line.strip() for line in paragraph.splitlines()))
    return "\n\n".join(paragraphs)


def choices(values: Sequence[str]) -> str:
    """The metavar of an option that takes one of ``values``: ``[nft|iptables]``."""
    return "[" + "|".join(values) + "]"


def _show_flags_bare(params: Iterable[Any]) -> None:
    # A flag takes no value, so nothing is shown after it: an empty metavar, which Typer
    # prints as it is instead of the parameter's type.
    for param in params:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", None) is None:
            param.metavar = ""


class _FlagsShownBare:
    """Shows a command's flags (``--help`` included) with nothing after them."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _show_flags_bare(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        _show_flags_bare([option])
        return option


class Command(_FlagsShownBare, typer.core.TyperCommand):
    """Typer's command, with its flags shown bare."""


class Group(_FlagsShownBare, typer.core.TyperGroup):
    """Typer's group of commands, with its flags shown bare."""
