# Type information for the compiled header codec (kitegreen/codec/_headers.c).
from collections.abc import Mapping
from typing import Final, Literal

from typing_extensions import Buffer

MAX_HEADER_ENTRIES: Final[int]
MAX_INFO_BLOCKS: Final[int]
CODEC_BINARY: Final[int]
CODEC_COMPACT: Final[int]

class HeaderFrame:
    """One parsed request frame: its header, and the Thrift message it carries."""

    @property
    def kind(self) -> Literal["ttheader", "theader"]: ...
    @property
    def flags(self) -> int:
        """FLAGS, as sent (``FLAG_*``); a reply echoes them."""
    @property
    def seqid(self) -> int:
        """SEQID, signed 32-bit; the message inside carries its own, which may differ (Kitex
        tolerates a mismatch, logging a warning)."""
    @property
    def protocol(self) -> Literal["binary", "compact"]:
        """The payload's protocol."""
    @property
    def protocol_id(self) -> int:
        """The protocol id as sent (TTHeader compact is 2 or 3); a reply repeats it."""
    @property
    def codec_protocol(self) -> int:
        """The payload's protocol as kitegreen's codec numbers it (``_thrift.BINARY``,
        ``_thrift.COMPACT``)."""
    @property
    def transforms(self) -> tuple[int, ...]:
        """THeader transforms undone to get :attr:`payload` (``(1,)`` zlib, or ``()``); a
        reply applies them again, as fbthrift's server does."""
    @property
    def int_info(self) -> dict[int, str]:
        """TTHeader integer key-values (keys are ``IntKey`` numbers); empty for THeader. Read
        from the header on first access."""
    @property
    def str_info(self) -> dict[str, str]:
        """TTHeader string key-values, or THeader key-values (persistent ones included, the
        per-request value winning on a clash). A key sent twice keeps its last value. Read
        from the header on first access."""
    @property
    def log_id(self) -> str | None:
        """TTHeader's ``LOG_ID`` integer key-value (the last sent); None when absent or empty,
        and for THeader. Decoded by the parse, which found it: no walk over the header."""
    @property
    def acl_token(self) -> str | None:
        """TTHeader's ACL token (0x11 block), or None."""
    @property
    def payload(self) -> bytes | memoryview:
        """The Thrift message. A view into the buffer given to ``parse_frame`` when no
        transform applied (made on first access): keep that buffer unchanged while the payload
        is in use."""
    @property
    def buffer(self) -> Buffer:
        """The object the message is in: the buffer parsed, or the inflated payload."""
    @property
    def payload_start(self) -> int:
        """Where the message starts in :attr:`buffer`."""
    @property
    def payload_end(self) -> int:
        """Where the message ends in :attr:`buffer`."""
    @property
    def payload_framed(self) -> bool:
        """True when a TTHeader payload was itself framed (Kitex's TTHeaderFramed); the 4-byte
        length is not part of :attr:`payload`."""
    def str_value(self, key: str, /) -> str | None:
        """One string header (a TTHeader string key-value, a THeader header; a per-request one
        before a persistent one), read without the others; None when absent."""
    def int_value(self, key: int, /) -> str | None:
        """One TTHeader integer key-value (the last sent), read without the others; None when
        absent, and for THeader."""
    def reply(
        self,
        payload: Buffer,
        *,
        str_info: Mapping[str, str] | None = None,
        int_info: Mapping[int, str] | None = None,
    ) -> bytes:
        """Build the reply frame for this request: same kind, protocol id, seqid, flags,
        transforms and payload framing.

        Args:
            payload: the encoded reply message.
            str_info: string key-values to send back (``biz-status``, ``crrst``, backward
                metainfo); THeader key-values for a THeader request.
            int_info: integer key-values to send back; TTHeader only.

        Returns:
            The whole frame, LENGTH included.

        Raises:
            ProtocolError: the key-values cannot be carried by this header format.
        """
    def answer(
        self, payload: Buffer, message_type: int, str_info: Mapping[str, str] | None, /
    ) -> bytes:
        """:meth:`reply` as the request loop sends it: positional, and for TTHeader with the
        ``MSG_TYPE`` integer key-value set to ``message_type`` (1-4), as a Kitex server writes
        it. THeader carries no integer key-values: ``message_type`` is only checked."""
    def with_payload(self, payload: bytes | memoryview, /) -> HeaderFrame:
        """The same frame carrying another payload (an inflated one)."""

def parse(buf: Buffer, start: int, end: int, max_frame_size: int, /) -> HeaderFrame: ...
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
