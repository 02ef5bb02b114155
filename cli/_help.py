"""Command help from docstrings, laid out for the terminal.

Typer's rich help keeps every line break of a docstring after its first paragraph, so text
wrapped at 100 columns in the source comes out ragged at 80. Prose paragraphs are joined
into one line each here for the terminal to wrap; a paragraph that starts with ``\\b`` (click's
"do not rewrap" mark) is an example block and keeps its lines.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def help_of(command: Callable[..., Any]) -> str:
    text = inspect.cleandoc(command.__doc__ or "")
    paragraphs = []
    for paragraph in text.split("\n\n"):
        if paragraph.startswith("\b\n"):
            paragraphs.append(paragraph.removeprefix("\b\n"))
        else:
            paragraphs.append(" ".join(line.strip() for line in paragraph.splitlines()))
    return "\n\n".join(paragraphs)
