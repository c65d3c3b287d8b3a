# Type information for kitegreen/transport/_sockio.c.
from typing import Final

RECV_SIZE: Final[int]

def recv(fd: int, /) -> bytes: ...
def send(fd: int, data: bytes, /) -> int: ...
