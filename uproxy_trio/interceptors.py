"""Ready-made interceptors, for ``uproxy serve --interceptor uproxy_trio.interceptors:NAME``
and for composing in Python."""

from ._label import label

__all__ = ["label"]
