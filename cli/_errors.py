"""How the command line fails: one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import sys
from typing import NoReturn

# Exit codes: 2 is what argument parsers use for a usage error; 1 is a failure at run time.
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A failure to report as ``uproxy: error: MESSAGE`` with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, exit_code: int) -> NoReturn:
    print(f"uproxy: error: {message}", file=sys.stderr)
    sys.exit(exit_code)
