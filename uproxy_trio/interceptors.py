"""Ready-made interceptors, for composing in Python and for the command line.

Each is a factory marked with ``interceptor_factory``, so ``uproxy serve --interceptor
'uproxy_trio.interceptors:replace(b"a", b"b")'`` calls it with the literal arguments given and
uses what it returns.
"""

from ._hexdump import format_hexdump, hexdump
from ._label import label
from ._pacing import delay, throttle
from ._replace import regex_replace, replace

__all__ = ["delay", "format_hexdump", "hexdump", "label", "regex_replace", "replace", "throttle"]
