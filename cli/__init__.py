"""The ``uproxy`` command line (installed as ``uproxy_cli``)."""

from ._app import app, main

__all__ = ["app", "main"]
