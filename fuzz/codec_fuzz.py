"""A structure-aware fuzz target for kitegreen's wire code: the compiled Thrift codec
(``kitegreen.codec._thrift``: scan, Scanner.feed, frame_end, read_message_begin, read_struct,
read_args, write_message, write_result) and the header parser's public functions
(``kitegreen.codec.headers``: header_kind, parse_frame, build_frame, HeaderFrame.reply), and
the request loop's socket calls (``kitegreen.transport._sockio``: recv, send).

Run it under AddressSanitizer and UBSan with ``tox -e asan`` (which builds an instrumented codec
into the tox environment), or by hand against any build::

    python fuzz/codec_fuzz.py --seconds 60 --seed 1
    python fuzz/codec_fuzz.py --seed 1 --replay 12345      # one case again, verbosely

Each case is drawn from ``random.Random(f"{seed}:{index}")``, so a case is reproduced from its
seed and index alone. The index of the case in progress is written to ``--case-file`` before it
runs: when the sanitizer aborts the process, that file names the case to replay.

What it generates and what it checks (the oracles):

* valid values of every struct of the test IDLs (tests/idl/*.thrift), magic integers included.
  Encoded by kitegreen in both protocols, framed or not: the bytes equal thriftpy2's (its Cython
  binary writer, its compact writer), decode back to an equal value (read_struct and
  read_args), scan finds the message's end from the whole buffer and byte by byte from random
  splits (Scanner.feed), frame_end finds the frame's.
* mutated messages (bit flips, magic bytes and integers, cuts, inserts, deletes, duplicated
  chunks, splices of two messages): decode either succeeds or raises ProtocolError, never
  anything else; scan agrees with decode on where the message ends; a binary message kitegreen
  decodes, thriftpy2's Cython reader decodes to the same value.
* hostile Python values to encode: objects whose __bool__, __index__, __float__, __iter__,
  __eq__, __hash__, __buffer__, properties or items() change the container being encoded or
  raise. Encoding either fails with an exception or gives bytes that decode and scan whole.
* the budgeted encode (write_message's values and slice): the same bytes as one call within
  the budget, EncodeBudgetExceeded past it; and encodes that let go of the GIL at every value
  in a thread of their own while the main thread changes the containers being encoded (clears,
  grows, shrinks, swaps entries): an exception or bytes that decode and scan whole. Which value
  a change lands on depends on thread timing, so such a case replays only approximately.
* the functions' own arguments: spans, sizes and protocol ids out of range, bytes, bytearray
  and memoryview buffers, frames of any announced length, structs nested around the limit.
* header frames built from random key-values, transforms and flags parse back to what was built;
  mutated frames parse or raise ProtocolError/FrameTooLarge; a parsed frame's reply parses.
* recv and send of chunks of any size, the 64 KiB buffer's edges among them, through a socket
  pair that fills up and drains: the bytes arrive whole and in order; wrong arguments raise
  TypeError, OverflowError or OSError; an end of stream reads b"".

Any other outcome is a finding: it is printed with its seed and index, and the run exits 1.
Every finding fixed becomes a regression test in tests/test_codec_safety.py.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import thriftpy2
from thriftpy2.protocol.compact import TCompactProtocol
from thriftpy2.protocol.cybin import TCyBinaryProtocol
from thriftpy2.thrift import TType
from thriftpy2.transport.memory import TCyMemoryBuffer

from kitegreen.codec import _headers, _thrift, headers
from kitegreen.exceptions import FrameTooLarge, ProtocolError
from kitegreen.transport import _sockio

IDL_DIR = Path(__file__).resolve().parent.parent / "tests" / "idl"
PROTOCOLS = {"binary": _thrift.BINARY, "compact": _thrift.COMPACT}
MAX_SIZE = 1 << 20
CALL = 1

MAGIC_INTS = {
    TType.BYTE: [0, 1, -1, 127, -128],
    TType.I16: [0, 1, -1, 2**15 - 1, -(2**15), 255, 256],
    TType.I32: [0, 1, -1, 2**31 - 1, -(2**31), 2**16, 2**24 - 1],
    TType.I64: [0, 1, -1, 2**63 - 1, -(2**63), 2**32, 2**53 + 1],
}
MAGIC_BYTES = [0x00, 0x01, 0x02, 0x0F, 0x7F, 0x80, 0x81, 0x82, 0xFF, 0x0B, 0x0C, 0x0D, 0x0E]
MAGIC_WORDS = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 0x80010001, 0x10000, 64, 65]  # fmt: skip


class Finding(Exception):
    """An outcome no input may produce."""


class HostileError(Exception):
    """Raised on purpose by a hostile value: an acceptable encode failure."""


# -- the IDLs -----------------------------------------------------------------------------------


def load_structs() -> list[type]:
    """Every struct, exception and service args/result class of the test IDLs."""
    classes: list[type] = []
    for path in sorted(IDL_DIR.glob("*.thrift")):
        module = thriftpy2.load(str(path), module_name=f"fuzz_{path.stem}_thrift")
        meta = module.__thrift_meta__
        classes += meta["structs"] + meta["exceptions"]
        for service in meta["services"]:
            for name in service.thrift_services:
                classes.append(getattr(service, f"{name}_args"))
                result = getattr(service, f"{name}_result", None)
                if result is not None:
                    classes.append(result)
    return classes


def field_specs(cls: type) -> Iterator[tuple[int, int, str, Any]]:
    for fid, spec in cls.thrift_spec.items():  # type: ignore[attr-defined]
        sub = spec[2] if len(spec) == 4 else None
        yield fid, spec[0], spec[1], sub


def split(spec: Any) -> tuple[int, Any]:
    """A container's element spec: a ttype, or (ttype, its own sub-spec)."""
    return (spec, None) if isinstance(spec, int) else (spec[0], spec[1])


# -- valid values ------------------------------------------------------------------------------


def gen_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        return ""
    if kind < 0.5:
        return "".join(rng.choice("abcxyz_") for _ in range(rng.randrange(1, 12)))
    chars = [chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD800),
                             rng.randrange(0xE000, 0x110000)]))
             for _ in range(rng.randrange(1, 8))]  # fmt: skip
    return "".join(chars)


def gen_value(rng: random.Random, ttype: int, sub: Any, depth: int) -> Any:
    if ttype == TType.BOOL:
        return rng.random() < 0.5
    if ttype in MAGIC_INTS:
        if sub is not None and hasattr(sub, "_VALUES_TO_NAMES") and rng.random() < 0.7:
            return rng.choice(list(sub._VALUES_TO_NAMES))
        if rng.random() < 0.5:
            return rng.choice(MAGIC_INTS[ttype])
        bits = {TType.BYTE: 8, TType.I16: 16, TType.I32: 32, TType.I64: 64}[ttype]
        return rng.randrange(-(2 ** (bits - 1)), 2 ** (bits - 1))
    if ttype == TType.DOUBLE:
        return rng.choice([0.0, -0.0, 1.5, -1e308, 5e-324, math.inf, -math.inf,
                           rng.uniform(-1e6, 1e6)])  # fmt: skip
    if ttype == TType.STRING:
        return gen_text(rng)
    if ttype == TType.BINARY:
        return rng.randbytes(rng.choice([0, 1, 3, 17]))
    if ttype in (TType.LIST, TType.SET):
        et, esub = split(sub)
        n = 0 if depth <= 0 else rng.choice([0, 1, 2, 3, 5, 16])
        items = [gen_value(rng, et, esub, depth - 1) for _ in range(n)]
        if ttype == TType.SET:
            try:
                return set(items)
            except TypeError:  # unhashable elements (a set of lists): a list encodes alike
                return items
        return items
    if ttype == TType.MAP:
        (kt, ksub), (vt, vsub) = split(sub[0]), split(sub[1])
        out: dict[Any, Any] = {}
        for _ in range(0 if depth <= 0 else rng.choice([0, 1, 2, 4])):
            key = gen_value(rng, kt, ksub, depth - 1)
            # An unhashable key (map<list<i32>, i32>) leaves the map smaller.
            with contextlib.suppress(TypeError):
                out[key] = gen_value(rng, vt, vsub, depth - 1)
        return out
    if ttype == TType.STRUCT:
        return gen_struct(rng, sub, depth - 1)
    raise AssertionError(f"type {ttype}")


def gen_struct(rng: random.Random, cls: Any, depth: int) -> Any:
    obj = cls()
    for _, ttype, name, sub in field_specs(cls):
        if depth <= 0 and ttype == TType.STRUCT:
            value = None
        else:
            value = None if rng.random() < 0.25 else gen_value(rng, ttype, sub, depth)
        setattr(obj, name, value)
    return obj


def canonical(value: Any) -> Any:
    """A comparable form: sets as lists (they decode as lists), NaN as a token."""
    if isinstance(value, float):
        return ("nan",) if math.isnan(value) else value
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [canonical(v) for v in value]  # encoded, and so decoded, in iteration order
    if isinstance(value, dict):
        return sorted(((canonical(k), canonical(v)) for k, v in value.items()), key=repr)
    if hasattr(value, "thrift_spec"):
        # A field left None arrives as its IDL default: compare it as that.
        defaults = dict(getattr(type(value), "default_spec", ()))
        fields = []
        for _, _, name, _ in field_specs(type(value)):
            v = getattr(value, name, None)
            fields.append(canonical(defaults.get(name) if v is None else v))
        return (type(value).__name__, fields)
    return value


# -- thriftpy2, the reference -----------------------------------------------------------------


def tp2_write(protocol: str, obj: Any) -> bytes:
    buf = TCyMemoryBuffer()
    proto = TCyBinaryProtocol(buf) if protocol == "binary" else TCompactProtocol(buf)
    proto.write_message_begin("fuzz", CALL, 7)
    proto.write_struct(obj)
    proto.write_message_end()
    return bytes(buf.getvalue())


def tp2_read_binary_body(body: bytes, cls: Any) -> Any:
    obj = cls()
    TCyBinaryProtocol(TCyMemoryBuffer(body)).read_struct(obj)
    return obj


_FIXED_SIZES = {TType.BOOL: 1, TType.BYTE: 1, TType.I16: 2, TType.I32: 4, TType.I64: 8,
                TType.DOUBLE: 8}  # fmt: skip
_BIN_TYPES = (TType.STRING, TType.BINARY)


def tp2_map_quirk(data: bytes, pos: int, cls: Any) -> bool:
    """Whether thriftpy2's Cython reader reads this binary message its own way: it takes a map
    whose key or value type on the wire is STRING as having the declared types (reading a
    string's length as an i32 key, say), where kitegreen skips the mismatched map. The message
    is walked as kitegreen reads it (it decoded, so it is well formed)."""
    found = False

    def skip(p: int, t: int) -> int:
        if t in _FIXED_SIZES:
            return p + _FIXED_SIZES[t]
        if t == TType.STRING:
            return p + 4 + struct.unpack_from("!i", data, p)[0]
        if t == TType.STRUCT:
            return struct_(p, None)
        if t in (TType.LIST, TType.SET):
            et, n = data[p], struct.unpack_from("!i", data, p + 1)[0]
            p += 5
            for _ in range(n):
                p = skip(p, et)
            return p
        kt, vt, n = data[p], data[p + 1], struct.unpack_from("!i", data, p + 2)[0]
        p += 6
        for _ in range(n):
            p = skip(skip(p, kt), vt)
        return p

    def value(p: int, t: int, sub: Any) -> int:
        nonlocal found
        if t == TType.STRUCT:
            return struct_(p, sub)
        if t in (TType.LIST, TType.SET):
            et, esub = split(sub)
            wire_et, n = data[p], struct.unpack_from("!i", data, p + 1)[0]
            if wire_et != (TType.STRING if et == TType.BINARY else et):
                return skip(p, t)
            p += 5
            for _ in range(n):
                p = value(p, et, esub)
            return p
        if t == TType.MAP:
            (kt, ksub), (vt, vsub) = split(sub[0]), split(sub[1])
            wkt, wvt, n = data[p], data[p + 1], struct.unpack_from("!i", data, p + 2)[0]
            declared = [TType.STRING if x == TType.BINARY else x for x in (kt, vt)]
            if (wkt == TType.STRING and declared[0] != wkt) or (
                wvt == TType.STRING and declared[1] != wvt
            ):
                found = True
            if n == 0 or [wkt, wvt] != declared:
                return skip(p, t)
            p += 6
            for _ in range(n):
                p = value(value(p, kt, ksub), vt, vsub)
            return p
        return skip(p, TType.STRING if t == TType.BINARY else t)

    def struct_(p: int, spec_cls: Any) -> int:
        specs = {fid: (t, sub) for fid, t, _, sub in field_specs(spec_cls)} if spec_cls else {}
        while data[p] != TType.STOP:
            t, fid = data[p], struct.unpack_from("!h", data, p + 1)[0]
            p += 3
            declared = specs.get(fid)
            if declared and (declared[0] == t or (declared[0] == TType.BINARY and t == 11)):
                p = value(p, declared[0], declared[1])
            else:
                p = skip(p, t)
        return p + 1

    struct_(pos, cls)
    return found


# -- kitegreen ----------------------------------------------------------------------------------


def kg_write(protocol: str, obj: Any, framed: bool = False) -> bytes:
    spec = _thrift.compile(type(obj))
    return _thrift.write_message(PROTOCOLS[protocol], "fuzz", CALL, 7, obj, spec, framed)


def kg_read(protocol: str, data: bytes, cls: Any, as_args: bool = False) -> tuple[Any, int]:
    """The struct (or args tuple) of a whole message, and where its body began."""
    proto = PROTOCOLS[protocol]
    _, _, _, pos = _thrift.read_message_begin(proto, data, 0, len(data))
    read = _thrift.read_args if as_args else _thrift.read_struct
    return read(proto, data, pos, len(data), _thrift.compile(cls)), pos


def kg_scan(protocol: str, data: bytes, max_size: int = MAX_SIZE) -> int | None:
    """Where the first message ends; None when scan wants more bytes. Raises ProtocolError."""
    found = _thrift.scan(PROTOCOLS[protocol], data, 0, len(data), max_size)
    return found if isinstance(found, int) else None


# -- the cases --------------------------------------------------------------------------------


class Fuzzer:
    def __init__(self, seed: int, verbose: bool = False) -> None:
        self.seed = seed
        self.verbose = verbose
        self.structs = load_structs()
        self.node_cls = next(c for c in self.structs if c.__name__ == "Node")
        self.counts: dict[str, int] = {}
        self.cases: list[tuple[str, Callable[[random.Random], None]]] = [
            ("valid", self.case_valid),
            ("mutated", self.case_mutated),
            ("mutated", self.case_mutated),
            ("mutated", self.case_mutated),
            ("hostile", self.case_hostile),
            ("threaded", self.case_threaded),
            ("headers", self.case_headers),
            ("api", self.case_api),
            ("sockio", self.case_sockio),
        ]

    def run_case(self, index: int) -> str:
        rng = random.Random(f"{self.seed}:{index}")  # noqa: S311 - reproducible, not secret
        name, case = rng.choice(self.cases)
        case(rng)
        self.counts[name] = self.counts.get(name, 0) + 1
        return name

    def note(self, *args: Any) -> None:
        if self.verbose:
            print(*args)

    def fresh(self, rng: random.Random, protocol: str | None = None) -> tuple[str, bytes, Any]:
        """A valid message of a random struct, made from this case's own generator: a case
        never depends on the cases before it, so any case replays alone."""
        cls = rng.choice(self.structs)
        protocol = protocol or rng.choice(["binary", "compact"])
        return protocol, kg_write(protocol, gen_struct(rng, cls, depth=rng.choice([1, 2, 3]))), cls

    # valid values: agreement with thriftpy2, round trips, scan and frame_end ------------------

    def case_valid(self, rng: random.Random) -> None:
        cls = rng.choice(self.structs)
        obj = gen_struct(rng, cls, depth=rng.choice([1, 2, 3, 4]))
        protocol = rng.choice(["binary", "compact"])
        data = kg_write(protocol, obj)
        self.note("valid", protocol, cls.__name__, obj, data.hex())
        if data != tp2_write(protocol, obj):
            raise Finding(f"{protocol} bytes differ from thriftpy2's for {obj!r}")
        back, pos = kg_read(protocol, data, cls)
        if canonical(back) != canonical(obj):
            raise Finding(f"round trip changed {obj!r} into {back!r}")
        args, _ = kg_read(protocol, data, cls, as_args=True)
        if canonical(list(args)) != [
            canonical(getattr(back, n)) for _, _, n, _ in field_specs(cls)
        ]:
            raise Finding(f"read_args {args!r} differs from read_struct {back!r}")
        if protocol == "binary" and canonical(tp2_read_binary_body(data[pos:], cls)) != canonical(
            back
        ):
            raise Finding("thriftpy2 reads another value from kitegreen's bytes")
        if kg_scan(protocol, data) != len(data):
            raise Finding(f"scan of a whole {len(data)}-byte message: {kg_scan(protocol, data)}")
        self.check_feed(protocol, data, rng)
        framed = kg_write(protocol, obj, framed=True)
        if framed[4:] != data or _thrift.frame_end(framed, 0, len(framed), MAX_SIZE) != len(framed):
            raise Finding("framed message is not the message after its length")
        cut = rng.randrange(len(framed))
        if _thrift.frame_end(framed, 0, cut, MAX_SIZE) != -1:
            raise Finding("frame_end found a frame in a prefix")
        self.check_result(protocol, cls, obj, rng)
        self.check_budget(protocol, cls, obj, data, rng)

    def check_budget(
        self, protocol: str, cls: Any, obj: Any, data: bytes, rng: random.Random
    ) -> None:
        """Within its budget of values an encode gives the bytes of one call, letting go of the
        GIL or not; past it, EncodeBudgetExceeded."""
        spec = _thrift.compile(cls)
        values = rng.choice([0, 1, 2, 5, 20, 100, 1000, sys.maxsize])
        slice_ = rng.choice([0, 1, 2, 7, 4096])
        try:
            budgeted = _thrift.write_message(
                PROTOCOLS[protocol], "fuzz", CALL, 7, obj, spec, False, values, slice_
            )
        except _thrift.EncodeBudgetExceeded:
            if values == sys.maxsize:
                raise Finding("EncodeBudgetExceeded with no budget") from None
            self.counts["over budget"] = self.counts.get("over budget", 0) + 1
            return
        if budgeted != data:
            raise Finding(f"an encode within {values} values differs from one call")

    def check_result(self, protocol: str, cls: Any, obj: Any, rng: random.Random) -> None:
        """write_result of one field is write_message of the struct with that field alone."""
        fid, _, name, _ = rng.choice(list(field_specs(cls)) or [(0, 0, "", None)])
        if not name:
            return
        value = getattr(obj, name)
        alone = cls()
        for _, _, other, _ in field_specs(cls):
            setattr(alone, other, None)
        setattr(alone, name, value)
        spec = _thrift.compile(cls)
        framed = rng.random() < 0.5
        data = _thrift.write_result(PROTOCOLS[protocol], "fuzz", CALL, 7, fid, value, spec, framed)
        if data != kg_write(protocol, alone, framed):
            raise Finding(f"write_result of field {fid} differs from write_message")

    def check_feed(self, protocol: str, data: bytes, rng: random.Random) -> None:
        """Scanning from any split points, resumed with feed, finds the same end."""
        buf = b"pad" + data + b"next"
        start, have = 3, 3 + rng.randrange(len(data))
        found: Any = _thrift.scan(PROTOCOLS[protocol], buf, start, have, MAX_SIZE)
        if isinstance(found, _thrift.Scanner):
            scanner, found = found, -1
            while found == -1:
                if have == len(buf):
                    raise Finding("a resumed scan never found the message's end")
                have = min(len(buf), have + rng.choice([1, 2, 7, 64]))
                found = scanner.feed(buf, start, have)
        if found != start + len(data):
            raise Finding(f"resumed scan ended at {found}, the message at {start + len(data)}")

    # mutated messages: decode refuses or agrees with scan and thriftpy2 -----------------------

    def case_mutated(self, rng: random.Random) -> None:
        protocol, data, cls = self.fresh(rng)
        if rng.random() < 0.2:
            cls = rng.choice(self.structs)  # decoded as another struct: skipping, mismatches
        mutated = self.mutate(rng, data)
        self.note("mutated", protocol, cls.__name__, mutated.hex())
        self.check_bytes(protocol, mutated, cls, rng)

    def mutate(self, rng: random.Random, data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 3, 6])):
            op = rng.randrange(9)
            pos = rng.randrange(len(buf) + 1) if buf else 0
            if op == 0 and buf:
                buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
            elif op == 1 and buf:
                buf[min(pos, len(buf) - 1)] = rng.choice(MAGIC_BYTES)
            elif op == 2:
                word = rng.choice(MAGIC_WORDS)
                packed = struct.pack("!I", word) if rng.random() < 0.5 else _varint(word)
                buf[pos : pos + len(packed)] = packed
            elif op == 3:
                del buf[pos:]
            elif op == 4:
                buf[pos:pos] = rng.randbytes(rng.choice([1, 2, 4, 9]))
            elif op == 5:
                del buf[pos : pos + rng.choice([1, 2, 4, 16])]
            elif op == 6 and buf:
                a = rng.randrange(len(buf))
                chunk = buf[a : a + rng.choice([1, 4, 16, 64])]
                buf[pos:pos] = chunk * rng.choice([1, 2, 8])
            elif op == 7:
                other = self.fresh(rng)[1]
                a = rng.randrange(len(other))
                buf[pos:] = other[a:]
            elif op == 8:
                buf[pos:pos] = bytes([rng.choice(MAGIC_BYTES)])
        return bytes(buf)

    def check_bytes(self, protocol: str, data: bytes, cls: Any, rng: random.Random) -> None:
        try:
            back, pos = kg_read(protocol, data, cls)
        except ProtocolError:
            back = None
        end = scan_outcome(lambda: kg_scan(protocol, data))
        if data:
            # Scanning resumed from a split point ends where the whole scan does, or fails too.
            split = rng.randrange(len(data))

            def resumed() -> int | None:
                found = _thrift.scan(PROTOCOLS[protocol], data, 0, split, MAX_SIZE)
                if isinstance(found, _thrift.Scanner):
                    found = found.feed(data, 0, len(data))
                return None if found == -1 else found

            if scan_outcome(resumed) != end:
                raise Finding(f"scan resumed at {split} disagrees with the whole scan ({end})")
        if back is not None:
            self.counts["mutated decoded"] = self.counts.get("mutated decoded", 0) + 1
            if end != len(data):
                raise Finding(f"decode took all {len(data)} bytes, scan says {end}")
            args, _ = kg_read(protocol, data, cls, as_args=True)
            if len(args) != len(cls.thrift_spec):
                raise Finding("read_args gave a tuple of the wrong size")
            if protocol == "binary" and not tp2_map_quirk(data, pos, cls):
                theirs = tp2_read_binary_body(data[pos:], cls)
                if canonical(theirs) != canonical(back):
                    raise Finding(f"thriftpy2 reads {theirs!r}, kitegreen {back!r}")
            # What was decoded encodes again, and reads back the same.
            again = kg_write(protocol, back)
            if canonical(kg_read(protocol, again, cls)[0]) != canonical(back):
                raise Finding("a decoded value did not survive a round trip")
        elif end is not None and end > 0:
            try:
                kg_read(protocol, data[:end], cls)
            except ProtocolError as exc:
                if "cannot be a Python dict key" not in str(exc):
                    raise Finding(f"scan found {end} bytes decode refuses: {exc}") from exc

    # hostile Python values to encode ----------------------------------------------------------

    def case_hostile(self, rng: random.Random) -> None:
        cls = rng.choice(self.structs)
        obj = gen_struct(rng, cls, depth=3)
        targets = list(_containers(obj))
        for _ in range(rng.choice([1, 2, 3])):
            plant_hostile(rng, obj, targets)
        protocol = rng.choice(["binary", "compact"])
        self.note("hostile", protocol, cls.__name__, obj)
        framed = rng.random() < 0.3
        global ARMED
        ARMED = True
        try:
            data = kg_write(protocol, obj, framed=framed)
        except (TypeError, ValueError, OverflowError, RuntimeError, AttributeError, HostileError,
                UnicodeError, BufferError, RecursionError):  # fmt: skip
            return
        finally:
            ARMED = False
        self.counts["hostile encoded"] = self.counts.get("hostile encoded", 0) + 1
        if framed and _thrift.frame_end(data, 0, len(data), 1 << 30) != len(data):
            raise Finding("a framed message's length is not its own")
        message = data[4:] if framed else data
        try:
            kg_read(protocol, message, cls)
        except ProtocolError as exc:
            if "cannot be a Python dict key" not in str(exc):
                raise Finding(f"an encoded hostile value does not decode: {exc}") from exc
        if kg_scan(protocol, message) != len(message):
            raise Finding("an encoded hostile value does not scan whole")

    def case_threaded(self, rng: random.Random) -> None:
        """Encode in a thread that lets go of the GIL at every value (as replies off the hub
        are encoded) while this thread changes the containers it walks."""
        cls = rng.choice(self.structs)
        obj = gen_struct(rng, cls, depth=3)
        targets = list(_containers(obj))
        lists = [p for p, _, _ in targets if isinstance(p, list) and 0 < len(p) < 64]
        for parent in rng.sample(lists, min(2, len(lists))):
            # Longer lists, so that the encode is still running when the attacks come.
            parent.extend(parent * rng.choice([1, 8, 32]))
        victims = [p for p, _, _ in targets if isinstance(p, (list, dict))]
        if not victims:
            return
        attacks = [make_attack(rng, victims) for _ in range(4)]
        protocol = rng.choice(["binary", "compact"])
        spec = _thrift.compile(cls)
        slice_ = rng.choice([1, 1, 2, 16])
        out: list[Any] = []

        def encode() -> None:
            try:
                out.append(
                    _thrift.write_message(
                        PROTOCOLS[protocol], "fuzz", CALL, 7, obj, spec, False, sys.maxsize, slice_
                    )
                )
            except (TypeError, ValueError, OverflowError, RuntimeError, UnicodeError) as exc:
                out.append(exc)

        global ARMED
        ARMED = True
        worker = threading.Thread(target=encode)
        try:
            worker.start()
            rounds = 0
            while worker.is_alive() and rounds < 10_000:
                with contextlib.suppress(HostileError):
                    rng.choice(attacks)()
                rounds += 1
                time.sleep(0)
            worker.join(timeout=30)
            if rounds:
                self.counts["threaded raced"] = self.counts.get("threaded raced", 0) + 1
        finally:
            ARMED = False
        if worker.is_alive() or not out:
            raise Finding("a threaded encode did not finish")
        if isinstance(out[0], Exception):
            return
        self.counts["threaded encoded"] = self.counts.get("threaded encoded", 0) + 1
        try:
            kg_read(protocol, out[0], cls)
        except ProtocolError as exc:
            if "cannot be a Python dict key" not in str(exc):
                raise Finding(f"a threaded encode does not decode: {exc}") from exc
        if kg_scan(protocol, out[0], 1 << 30) != len(out[0]):
            raise Finding("a threaded encode does not scan whole")

    # the functions' own arguments -----------------------------------------------------------

    def case_api(self, rng: random.Random) -> None:
        """Spans, sizes and protocol ids of every kind, buffers of every type, frames with any
        length, structs nested around the depth limit: errors are the documented ones."""
        protocol, data, cls = self.fresh(rng)
        buf: Any = rng.choice([bytes, bytearray, memoryview])(self.mutate(rng, data))
        size = len(buf)
        edges = [-1, 0, 1, size - 1, size, size + 1, 2**31, 2**63 - 1, -(2**63)]
        start, end = rng.choice(edges), rng.choice(edges)
        proto = rng.choice([0, 2, 0, 2, 1, 3, -1, 2**40])
        max_size = rng.choice([1, 4, 64, size, MAX_SIZE, 0, -1, 2**62])
        spec = _thrift.compile(cls)
        calls = [
            lambda: _thrift.scan(proto, buf, start, end, max_size),
            lambda: _thrift.frame_end(buf, start, end, max_size),
            lambda: _thrift.read_message_begin(proto, buf, start, end),
            lambda: _thrift.read_struct(proto, buf, start, end, spec),
            lambda: _thrift.read_args(proto, buf, start, end, spec),
            lambda: _thrift.write_result(
                proto, "m", rng.choice([1, 2, 3, 4, 0, 5]), rng.choice(edges), start, None, spec,
                False,
            ),
        ]  # fmt: skip
        with contextlib.suppress(ProtocolError, ValueError, TypeError, OverflowError):
            rng.choice(calls)()
        # A 4-byte length of any value before the bytes: frame_end finds it or waits or refuses.
        framed = struct.pack("!I", rng.choice(MAGIC_WORDS)) + data
        try:
            found = _thrift.frame_end(framed, 0, len(framed), rng.choice([16, MAX_SIZE]))
        except ProtocolError:
            found = None
        if found is not None and found != -1 and not 4 < found <= len(framed):
            raise Finding(f"frame_end returned {found} for a {len(framed)}-byte buffer")
        # Structs nested around the limit of 64: encoded, or refused with ValueError.
        node = None
        for i in range(rng.choice([1, 62, 63, 64, 65, 66, 100])):
            node = self.node_cls(value=i, inner=node)
        try:
            message = kg_write(protocol, node)
        except ValueError:
            return
        if kg_scan(protocol, message) != len(message):
            raise Finding("a deep struct that encoded does not scan")
        try:
            kg_read(protocol, message, self.node_cls)
        except ProtocolError as exc:
            if "nested deeper" not in str(exc):
                raise

    # header frames ------------------------------------------------------------------------------

    def case_sockio(self, rng: random.Random) -> None:
        """The request loop's recv and send (``transport/_sockio.c``): chunks of any size, the
        64 KiB buffer's edges among them, arrive whole and in order through a socket pair, the
        sockets filling up and draining; arguments of the wrong type or range raise the
        documented errors; after the peer's end of stream recv gives b""."""
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.setblocking(False)
            theirs.setblocking(False)
            self.sockio(rng, ours, theirs)

    def sockio(self, rng: random.Random, ours: socket.socket, theirs: socket.socket) -> None:
        size = _sockio.RECV_SIZE
        sizes = [0, 1, 7, size - 1, size, size + 1, 3 * size, rng.randrange(1, 300_000)]
        chunks = [rng.randbytes(rng.choice(sizes)) for _ in range(rng.randrange(1, 6))]
        sent = bytearray()
        got = bytearray()
        for chunk in chunks:
            view = chunk
            while view:
                try:
                    taken = _sockio.send(ours.fileno(), view)
                except BlockingIOError:
                    taken = 0
                if not 0 <= taken <= len(view):
                    raise AssertionError(f"send took {taken} of {len(view)}")
                sent += view[:taken]
                view = view[taken:]
                # Drain the other side when full, or now and then.
                while taken == 0 or rng.random() < 0.3:
                    try:
                        data = _sockio.recv(theirs.fileno())
                    except BlockingIOError:
                        break
                    if not 0 < len(data) <= size:
                        raise AssertionError(f"recv gave {len(data)} bytes")
                    got += data
                    taken = 1
        while len(got) < len(sent):
            got += _sockio.recv(theirs.fileno())
        if got != sent:
            raise AssertionError(f"{len(sent)} bytes sent, {len(got)} differ on arrival")
        self.note("sockio", [len(c) for c in chunks])
        # Arguments: only the pair's own fds, -1 and numbers no fd can have, never another
        # open file of this process.
        # (Not True: it is the int 1, standard output.)
        fd = rng.choice([ours.fileno(), -1, -(2**31), 2**31, 2**63, 2**70, "3", 3.0, None])
        data_arg = rng.choice([b"x", b"", bytearray(b"x"), memoryview(b"x"), "x", None, 1])
        for call in (lambda: _sockio.recv(fd), lambda: _sockio.send(fd, data_arg)):
            with contextlib.suppress(TypeError, OverflowError, OSError):
                call()
        # Whatever went to theirs from the argument calls is read away; then an end of stream.
        with contextlib.suppress(BlockingIOError):
            while _sockio.recv(theirs.fileno()):
                pass
        if rng.random() < 0.1:
            ours.shutdown(socket.SHUT_WR)
            end = b"?"
            for _ in range(100):
                with contextlib.suppress(BlockingIOError):
                    end = _sockio.recv(theirs.fileno())
                    if end == b"":
                        break
            if end != b"":
                raise AssertionError(f"no end of stream after shutdown: {end!r}")

    def case_headers(self, rng: random.Random) -> None:
        kind = rng.choice(["ttheader", "theader"])
        protocol = rng.choice(["binary", "compact"])
        str_info = {gen_text(rng): gen_text(rng) for _ in range(rng.choice([0, 1, 3, 40]))}
        kwargs: dict[str, Any] = {}
        if kind == "ttheader":
            # LOG_ID (2) and RPC_TIMEOUT (12), which the parse finds, among random keys.
            int_keys = [rng.choice([2, 12, 22, rng.randrange(0x10000)]) for _ in range(3)]
            kwargs["int_info"] = {key: gen_text(rng) for key in int_keys}
            kwargs["acl_token"] = gen_text(rng) if rng.random() < 0.3 else None
            kwargs["payload_framed"] = rng.random() < 0.3
        else:
            kwargs["transforms"] = rng.choice([(), (headers.TRANSFORM_ZLIB,)])
        payload = self.fresh(rng, protocol)[1]
        seqid = rng.choice([0, 1, -1, 2**31 - 1, -(2**31)])
        flags = rng.randrange(0x10000)
        try:
            frame = headers.build_frame(
                kind, seqid=seqid, protocol=protocol, payload=payload, flags=flags,
                str_info=str_info, **kwargs,
            )  # fmt: skip
        except ProtocolError:
            return  # key-values the format cannot carry (an empty TTHeader key, ...)
        if headers.header_kind(frame[:6]) != kind:
            raise Finding(f"header_kind does not see a {kind} frame")
        parsed = headers.parse_frame(frame, max_frame_size=MAX_SIZE)
        self.check_str_value(rng, parsed, frame, str_info)
        self.check_int_value(parsed, frame, kwargs.get("int_info"))
        self.check_in_place(rng, frame)
        self.check_answer(rng, parsed)
        parsed = headers.parse_frame(frame, max_frame_size=MAX_SIZE)
        got = (parsed.kind, parsed.seqid, parsed.flags, parsed.protocol, bytes(parsed.payload))
        if got != (kind, seqid, flags, protocol, payload):
            raise Finding(f"{kind} frame parsed as {got!r}")
        if dict(parsed.str_info) != str_info:
            raise Finding(f"{kind} key-values {str_info!r} parsed as {parsed.str_info!r}")
        for _ in range(rng.choice([1, 4])):
            mutated = self.mutate(rng, frame)
            self.note("header", kind, mutated.hex())
            try:
                headers.header_kind(mutated[: rng.randrange(10)])
                parsed = headers.parse_frame(mutated, max_frame_size=rng.choice([64, MAX_SIZE]))
            except (ProtocolError, FrameTooLarge):
                continue
            if not parsed.payload:
                raise Finding("a parsed frame without a payload")
            self.check_str_value(rng, parsed, mutated, None)
            self.check_int_value(parsed, mutated, None)
            self.check_in_place(rng, mutated)
            self.check_answer(rng, parsed)
            try:
                reply = parsed.reply(b"\x80\x01\x00\x02", str_info=parsed.str_info)
            except (ProtocolError, FrameTooLarge):
                continue
            if headers.parse_frame(reply, max_frame_size=MAX_SIZE).seqid != parsed.seqid:
                raise Finding("a reply frame does not parse back")

    def check_str_value(
        self, rng: random.Random, parsed: Any, frame: bytes, sent: dict[str, str] | None
    ) -> None:
        """HeaderFrame.str_value, which walks the header bytes, against str_info, read after
        it (and against what was sent, if known)."""
        keys = [gen_text(rng) for _ in range(2)]
        # The frame's own keys, from a second parse's dict: `parsed` must not read its own yet.
        keys += list(headers.parse_frame(frame, max_frame_size=MAX_SIZE).str_info)
        direct = {key: parsed.str_value(key) for key in keys}
        known = {key: parsed.str_info.get(key) for key in keys}
        if direct != known or (sent and any(direct[key] != sent[key] for key in sent)):
            raise Finding(f"str_value read {direct!r} of {frame.hex()}, str_info {known!r}")

    def check_int_value(self, parsed: Any, frame: bytes, sent: dict[int, str] | None) -> None:
        """HeaderFrame.int_value and log_id, which read the values the parse found (LOG_ID,
        RPC_TIMEOUT) or walk the header (other keys), against int_info, read after them."""
        keys = [2, 12, 22, 0xFFFF, *headers.parse_frame(frame, max_frame_size=MAX_SIZE).int_info]
        direct = {key: parsed.int_value(key) for key in keys}
        log_id = parsed.log_id
        known = {key: parsed.int_info.get(key) for key in keys}
        if direct != known or log_id != (known[2] or None):
            raise Finding(f"int_value read {direct!r} (log_id {log_id!r}) of {frame.hex()}")
        if sent and any(direct[key] != sent[key] for key in sent):
            raise Finding(f"int_value read {direct!r} of {frame.hex()}, sent {sent!r}")

    def check_in_place(self, rng: random.Random, frame: bytes) -> None:
        """A frame parsed in place from bytes, and one parsed from a bytearray (at an offset)
        that is then overwritten, read the same values as the same frame alone."""
        prefix = bytes(rng.randrange(1, 9))
        from_bytes = headers.parse_frame(prefix + frame, start=len(prefix), max_frame_size=MAX_SIZE)
        scratch = bytearray(prefix + frame)
        from_array = headers.parse_frame(scratch, start=len(prefix), max_frame_size=MAX_SIZE)
        # The bytearray is the connection's buffer, reused for the next message.
        scratch[:] = bytes(len(scratch))
        alone = headers.parse_frame(frame, max_frame_size=MAX_SIZE)
        for got in (from_bytes, from_array):
            seen = (got.log_id, got.int_info, got.str_info, got.acl_token, got.codec_protocol)
            want = (alone.log_id, alone.int_info, alone.str_info, alone.acl_token,
                    alone.codec_protocol)  # fmt: skip
            if seen != want:
                raise Finding(f"{frame.hex()} parsed in place read {seen!r}, alone {want!r}")

    def check_answer(self, rng: random.Random, parsed: Any) -> None:
        """HeaderFrame.answer, the request loop's reply, byte for byte the reply() it stands
        for; key-values large enough to outgrow its header buffer on the stack included."""
        payload = rng.choice([b"\x80\x01\x00\x02", b"", bytes(rng.randrange(300))])
        size = rng.choice([0, 1, 3, 60])
        str_info = {gen_text(rng) + str(i): gen_text(rng) for i in range(size)}
        mtype = rng.randrange(1, 5)
        int_info = {22: str(mtype)} if parsed.kind == "ttheader" else None
        outcomes = []
        for build in (
            lambda: parsed.answer(payload, mtype, str_info or None),
            lambda: parsed.reply(payload, str_info=str_info or None, int_info=int_info),
        ):
            try:
                outcomes.append(build())
            except (ProtocolError, FrameTooLarge) as exc:
                outcomes.append(str(exc))
        if outcomes[0] != outcomes[1]:
            raise Finding(f"answer() gave {outcomes[0]!r}, reply() {outcomes[1]!r}")
        if not str_info and not parsed.transforms:
            # Without key-values or zlib, answer() writes its header from the frame's fields:
            # against the general builder, given the same fields.
            fields = (parsed.kind, parsed.seqid, parsed.protocol_id, payload, parsed.flags)
            general = _headers.build(*fields, None, int_info, None, (), parsed.payload_framed)
            if outcomes[0] != general:
                raise Finding(f"answer() gave {outcomes[0]!r}, build() {general!r}")


def scan_outcome(scan: Callable[[], int | None]) -> int | None:
    """A scan's end, None for 'more bytes', -1 for ProtocolError, -2 for FrameTooLarge."""
    try:
        return scan()
    except FrameTooLarge:
        return -2
    except ProtocolError:
        return -1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _containers(obj: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(parent, key-or-attr, value) for every value reachable in a struct: where to plant."""
    stack = [obj]
    while stack:
        cur = stack.pop()
        if hasattr(cur, "thrift_spec"):
            for _, _, name, _ in field_specs(type(cur)):
                value = getattr(cur, name, None)
                if value is not None:
                    yield cur, name, value
                    stack.append(value)
        elif isinstance(cur, list):
            for i, value in enumerate(cur):
                yield cur, i, value
                stack.append(value)
        elif isinstance(cur, dict):
            for key, value in list(cur.items()):
                yield cur, key, value
                stack.append(value)


# -- hostile values -------------------------------------------------------------------------------


def plant_hostile(rng: random.Random, root: Any, targets: list[tuple[Any, Any, Any]]) -> None:
    """Replace one value reachable from ``root`` by a hostile stand-in that attacks a container
    (its own parent, or any other) when the encoder touches it."""
    if not targets:
        return
    parent, key, value = rng.choice(targets)
    victims = [p for p, _, _ in targets if isinstance(p, (list, dict))] + [
        v for _, _, v in targets if isinstance(v, (list, dict, set))
    ]
    if isinstance(parent, (list, dict)) and rng.random() < 0.5:
        victims = [parent]  # the container the encoder is walking when the hook runs
    attack = make_attack(rng, victims)
    hostile = make_hostile(rng, value, attack)
    if isinstance(parent, list):
        parent[key] = hostile
    elif isinstance(parent, dict):
        try:
            parent[key] = hostile
        except TypeError:
            return
    else:
        setattr(parent, key, hostile)


ARMED = False
"""True while the encoder runs: hostile hooks attack only then."""


def make_attack(rng: random.Random, victims: list[Any]) -> Callable[[], None]:
    victim = rng.choice(victims) if victims else []
    kind = rng.randrange(7)

    def attack() -> None:
        if not ARMED:  # building the case: the attacks are for the encoder
            return
        if kind == 0:
            victim.clear()
        elif kind == 1 and isinstance(victim, list):
            victim.extend([None] * rng.choice([1, 100]))
        elif kind == 2 and isinstance(victim, list) and victim:
            victim.pop()
        elif kind == 3 and isinstance(victim, dict):
            for i in range(rng.choice([1, 50])):
                victim[f"added{i}"] = None
        elif kind == 4 and isinstance(victim, dict) and victim:
            victim.pop(next(iter(victim)))
            victim["swapped"] = None
        elif kind == 5:
            raise HostileError("hostile value refuses")
        # kind 6: touches nothing

    return attack


def make_hostile(rng: random.Random, value: Any, attack: Callable[[], None]) -> Any:
    """A stand-in for ``value`` whose hooks run ``attack``."""
    choice = rng.randrange(12)
    if choice == 0:
        return _Truthy(attack)
    if choice == 1:
        return _Index(attack)
    if choice == 2 and isinstance(value, int) and not isinstance(value, bool):
        return _int_subclass(attack)(value)
    if choice == 3 and isinstance(value, float):
        return _float_subclass(attack)(value)
    if choice == 4 and isinstance(value, (list, set)):
        return _iter_set(attack)(_hashable_items(value))
    if choice == 5 and isinstance(value, list):
        return _iter_list(attack)(value)
    if choice == 6 and isinstance(value, dict):
        return _KeptItems(value, attack)
    if choice == 7 and hasattr(value, "thrift_spec"):
        return _struct_with_property(type(value), value, attack, rng)
    if choice == 8 and isinstance(value, (bytes, str)):
        raw = value.encode() if isinstance(value, str) else value
        return _buffered(attack)(raw)
    if choice == 9 and isinstance(value, (list, set)):
        return {_EqHash(attack) for _ in range(3)} | set(_hashable_items(value))
    if choice == 10 and isinstance(value, dict):
        out = dict(value)
        out[_EqHash(attack)] = next(iter(value.values()), None)
        return out
    if choice == 11:
        return _Raising(attack)
    return value


def _hashable_items(value: Any) -> list[Any]:
    out = []
    for item in value:
        try:
            hash(item)
        except TypeError:
            continue
        out.append(item)
    return out


class _Truthy:
    def __init__(self, attack: Callable[[], None]) -> None:
        self.attack = attack

    def __bool__(self) -> bool:
        self.attack()
        return True

    def __len__(self) -> int:
        self.attack()
        return 1


class _Index:
    def __init__(self, attack: Callable[[], None]) -> None:
        self.attack = attack

    def __index__(self) -> int:
        self.attack()
        return 1

    def __float__(self) -> float:
        self.attack()
        return 1.0


class _Raising:
    def __init__(self, attack: Callable[[], None]) -> None:
        self.attack = attack

    def __getattr__(self, name: str) -> Any:
        self.attack()
        raise AttributeError(name)


class _EqHash:
    def __init__(self, attack: Callable[[], None]) -> None:
        self.attack = attack

    def __hash__(self) -> int:
        self.attack()
        return 7

    def __eq__(self, other: object) -> bool:
        self.attack()
        return other is self


def _int_subclass(attack: Callable[[], None]) -> type:
    class HostileInt(int):
        def __index__(self) -> int:
            attack()
            return 1

        def __int__(self) -> int:
            attack()
            return 1

        def __float__(self) -> float:
            attack()
            return 1.0

    return HostileInt


def _float_subclass(attack: Callable[[], None]) -> type:
    class HostileFloat(float):
        def __float__(self) -> float:
            attack()
            return 1.0

    return HostileFloat


def _iter_set(attack: Callable[[], None]) -> type:
    class HostileSet(set):  # type: ignore[type-arg]
        def __iter__(self) -> Iterator[Any]:
            attack()
            return super().__iter__()

        def __len__(self) -> int:
            attack()
            return super().__len__()

    return HostileSet


def _iter_list(attack: Callable[[], None]) -> type:
    class HostileList(list):  # type: ignore[type-arg]
        def __iter__(self) -> Iterator[Any]:
            attack()
            return super().__iter__()

        def __len__(self) -> int:
            attack()
            return super().__len__()

        def __getitem__(self, index: Any) -> Any:
            attack()
            return super().__getitem__(index)

    return HostileList


def _buffered(attack: Callable[[], None]) -> type:
    class HostileBytes(bytearray):
        def __buffer__(self, flags: int) -> memoryview:  # Python 3.12+: the buffer protocol
            attack()
            return memoryview(b"hostile")

    return HostileBytes


class _KeptItems(Mapping[Any, Any]):
    """A mapping whose items() returns a list it keeps, attacked while the encoder walks it."""

    def __init__(self, data: dict[Any, Any], attack: Callable[[], None]) -> None:
        self.pairs = list(data.items())
        self.attack = attack

    def items(self) -> Any:
        self.attack()
        return self.pairs

    def __getitem__(self, key: Any) -> Any:
        return dict(self.pairs)[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(dict(self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)


def _struct_with_property(cls: Any, value: Any, attack: Callable[[], None], rng: Any) -> Any:
    fields = [name for _, _, name, _ in field_specs(cls)]
    if not fields:
        return value
    target = rng.choice(fields)
    raise_attr = rng.random() < 0.3

    def getter(self: Any) -> Any:
        attack()
        if raise_attr:
            raise AttributeError("hostile property")
        return self.__dict__.get("_hostile_" + target)

    def setter(self: Any, v: Any) -> None:
        self.__dict__["_hostile_" + target] = v

    sub = type(f"Hostile{cls.__name__}", (cls,), {target: property(getter, setter)})
    obj = sub.__new__(sub)
    for name in fields:
        setattr(obj, name, getattr(value, name, None))
    return obj


# -- the driver -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    parser.add_argument("--runs", type=int, default=0, help="stop after this many cases (0: no)")
    parser.add_argument("--replay", type=int, help="run the case of this index only, verbosely")
    parser.add_argument("--case-file", default=".codec_fuzz_case", help="index in progress")
    args = parser.parse_args(argv)

    fuzzer = Fuzzer(args.seed, verbose=args.replay is not None)
    print(f"codec fuzz: seed {args.seed}, codec {_thrift.__file__}", flush=True)
    if args.replay is not None:
        fuzzer.run_case(args.replay)
        print("no finding")
        return 0

    fd = os.open(args.case_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    start = time.monotonic()
    deadline = start + args.seconds
    index = 0
    findings = 0
    while time.monotonic() < deadline and (not args.runs or index < args.runs):
        for _ in range(50):
            os.pwrite(fd, b"%-20d\n" % index, 0)
            try:
                fuzzer.run_case(index)
            except Exception:  # noqa: BLE001 - any exception escaping a case is a finding
                findings += 1
                print(f"FINDING: seed {args.seed} case {index} (replay with --seed "
                      f"{args.seed} --replay {index})", flush=True)  # fmt: skip
                traceback.print_exc()
                if findings >= 5:
                    break
            index += 1
        if findings >= 5:
            break
    os.close(fd)
    elapsed = time.monotonic() - start
    counts = ", ".join(f"{k} {v}" for k, v in sorted(fuzzer.counts.items()))
    print(
        f"codec fuzz: {index} cases in {elapsed:.1f} s ({index / elapsed:.0f}/s): {counts}; "
        f"{findings} finding(s)",
        flush=True,
    )
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
