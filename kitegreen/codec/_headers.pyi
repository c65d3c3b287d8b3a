# Type information for the compiled header codec (kitegreen/codec/_headers.c).
from collections.abc import Mapping
from typing import Any, Final

from typing_extensions import Buffer

MAX_HEADER_ENTRIES: Final[int]
MAX_INFO_BLOCKS: Final[int]

def parse(buf: Buffer, start: int, end: int, max_frame_size: int, /) -> Any: ...
def build(
    kind: str,
    seqid: int,
    protocol_id: int,
    payload: Buffer,
    flags: int,
    str_info: Mapping[str, str] | None,
    int_info: Mapping[int, str] | None,
    acl_token: str | None,
    transforms: tuple[int, ...],
    payload_framed: bool,
    /,
) -> bytes: ...
def set_frame_type(cls: type[tuple[Any, ...]], /) -> None: ...
