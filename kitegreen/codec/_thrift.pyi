# Type information for the compiled codec (kitegreen/codec/_thrift.c).
from typing import Any, Final

from typing_extensions import Buffer

from kitegreen.exceptions import KitegreenError

BINARY: Final[int]
COMPACT: Final[int]

class StructSpec: ...
class EncodeBudgetExceeded(KitegreenError): ...

class Scanner:
    def feed(self, buf: Buffer, start: int, end: int, /) -> int: ...

def compile(cls: type, /) -> StructSpec: ...
def frame_end(buf: Buffer, start: int, end: int, max_size: int, /) -> int: ...
def scan(protocol: int, buf: Buffer, start: int, end: int, max_size: int, /) -> int | Scanner: ...
def read_message_begin(
    protocol: int, buf: Buffer, start: int, end: int, /
) -> tuple[str | bytes, int, int, int]: ...
def read_struct(protocol: int, buf: Buffer, start: int, end: int, spec: StructSpec, /) -> Any: ...
def read_args(
    protocol: int, buf: Buffer, start: int, end: int, spec: StructSpec, /
) -> tuple[Any, ...]: ...
def write_message(
    protocol: int,
    name: str,
    mtype: int,
    seqid: int,
    obj: Any,
    spec: StructSpec,
    framed: bool,
    values: int = ...,
    slice: int = ...,
    /,
) -> bytes: ...
def write_result(
    protocol: int,
    name: str,
    mtype: int,
    seqid: int,
    fid: int,
    value: Any,
    spec: StructSpec,
    framed: bool,
    values: int = ...,
    slice: int = ...,
    /,
) -> bytes: ...
def read_args_within(
    protocol: int, buf: Buffer, start: int, end: int, spec: StructSpec, budget: int, slice: int, /
) -> tuple[tuple[Any, ...], int]: ...
def release(holder: list[Any], steps: int, /) -> bool: ...
