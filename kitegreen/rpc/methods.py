"""The dispatch table: one precomputed entry per IDL method, so a request costs a dict lookup.

thriftpy2's ``TProcessor`` rebuilds the argument list, looks the handler method up and scans
the result spec for exceptions on every call; here all of that is done once, at start, and each
method's argument and result structs are compiled for the codec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kitegreen.codec import _thrift
from kitegreen.exceptions import HandlerError


@dataclass(slots=True)
class Method:
    """One IDL method, ready to call.

    Attributes:
        name: the method name on the wire.
        args_cls: the generated ``<name>_args`` struct.
        result_cls: the generated ``<name>_result`` struct.
        func: the handler's bound method, called with the arguments the codec decodes as a
            tuple in IDL order (``_thrift.read_args``).
        oneway: whether the method sends no reply.
        declared: ``(exception class, result field id)`` for each ``throws`` clause.
        stats: per-method instruments (:meth:`attach_stats`).
        args_spec: ``args_cls`` compiled for the codec.
        result_spec: ``result_cls`` compiled for the codec.
    """

    name: str
    args_cls: type
    result_cls: type
    func: Callable[..., Any]
    oneway: bool
    declared: tuple[tuple[type[BaseException], int], ...]
    declared_types: tuple[type[BaseException], ...]
    stats: Any = field(default=None)

    args_spec: _thrift.StructSpec = field(init=False, repr=False)
    result_spec: _thrift.StructSpec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Requests decode into a tuple and replies encode straight from the value: neither an
        # args nor a result object is built per call (about 0.7 us of thriftpy2 __init__ and
        # attribute access on a ping).
        self.args_spec = _thrift.compile(self.args_cls)
        self.result_spec = _thrift.compile(self.result_cls)

    def declared_fid(self, exc: BaseException) -> int:
        """The result field id that carries ``exc``, an instance of a declared type."""
        for cls, fid in self.declared:
            if isinstance(exc, cls):
                return fid
        raise TypeError(f"{type(exc).__name__} is not declared by {self.name}")

    def attach_stats(self, stats: Any) -> None:
        """Count this method's calls in ``stats`` (a ``MethodStats``; None: not counted)."""
        self.stats = stats


def build_methods(service: Any, handler: object) -> dict[str, Method]:
    """Build the dispatch table for ``service`` served by ``handler``.

    Raises:
        HandlerError: ``service`` is not a thriftpy2 service, ``handler`` lacks one of its
            methods, or the IDL uses a type the codec does not support.
    """
    names = getattr(service, "thrift_services", None)
    if not isinstance(names, (list, tuple)):
        raise HandlerError(
            f"service must be a thriftpy2 service (thrift_module.ServiceName), got {service!r}"
        )
    missing = [n for n in names if not callable(getattr(handler, n, None))]
    if missing:
        raise HandlerError(
            f"handler {type(handler).__name__} does not implement "
            f"{', '.join(missing)} of service {getattr(service, '__name__', service)}"
        )
    methods: dict[str, Method] = {}
    for name in names:
        args_cls = getattr(service, f"{name}_args")
        result_cls = getattr(service, f"{name}_result")
        declared = tuple(
            (spec[2], fid)
            for fid, spec in sorted(result_cls.thrift_spec.items())
            if fid != 0 and spec[1] != "success"
        )
        try:
            methods[name] = Method(
                name=name,
                args_cls=args_cls,
                result_cls=result_cls,
                func=getattr(handler, name),
                oneway=bool(getattr(result_cls, "oneway", False)),
                declared=declared,
                declared_types=tuple(cls for cls, _ in declared),
            )
        except TypeError as exc:
            raise HandlerError(f"cannot serve {name}: {exc}") from None
    return methods
