"""Decode and encode cost of one request, codec against codec, in-process (no sockets).

``python benchmarks/codec.py`` times, for each call of ``bench.thrift`` (``ping``, a 1 KB
``echo``, ``records`` carrying 20 structs) and each protocol, what a server spends turning the
bytes of a whole request into its argument struct and its result into reply bytes:

=======================  =====================================================================
``kitegreen``            ``kitegreen.codec._thrift``: ``read_message_begin`` + ``read_struct``
                         from the bytes, ``write_message`` into new bytes.
``thriftpy2``            thriftpy2's Cython binary protocol (``cybin``) over a ``TCyMemoryBuffer``
                         made per message; for compact its pure-Python ``TCompactProtocol``.
``apache-fastbinary``    Apache Thrift's C accelerator (``thrift.protocol.fastbinary``) over a
                         ``TMemoryBuffer`` made per message, with thriftpy2's specs translated
                         to Apache's once, as kitegreen would have to.
=======================  =====================================================================

Each figure is the best of ``--repeat`` interleaved runs of ``--number`` calls, in µs per call:
the least disturbed by other load on a shared machine. Then the time to decode one valid
16 MiB request of each protocol (a string and a list of small structs), the issue's bound being
250 ms. Run by hand; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from servers import load_bench  # noqa: E402
from thriftpy2.protocol.compact import TCompactProtocol  # noqa: E402
from thriftpy2.protocol.cybin import TCyBinaryProtocol  # noqa: E402
from thriftpy2.thrift import TType  # noqa: E402
from thriftpy2.transport.memory import TCyMemoryBuffer  # noqa: E402

from kitegreen.codec import _thrift  # noqa: E402

CALL, REPLY = 1, 2
PROTOCOLS = {"binary": _thrift.BINARY, "compact": _thrift.COMPACT}


def make_calls(bench: Any) -> dict[str, tuple[Any, Any]]:
    """``{call: (args, result)}`` for the three benchmark calls."""
    records = [
        bench.Record(name=f"record-{i}", values=list(range(10)), attrs={"a": i, "b": -i, "c": 7})
        for i in range(20)
    ]
    svc = bench.Bench
    return {
        "ping": (svc.ping_args(), svc.ping_result()),
        "echo": (svc.echo_args(msg="x" * 1024), svc.echo_result(success="x" * 1024)),
        "records": (svc.records_args(records=records), svc.records_result(success=records)),
    }


def tp2_proto(protocol: str, buf: Any) -> Any:
    return TCyBinaryProtocol(buf) if protocol == "binary" else TCompactProtocol(buf)


def tp2_encode(protocol: str, name: str, mtype: int, obj: Any) -> bytes:
    buf = TCyMemoryBuffer()
    proto = tp2_proto(protocol, buf)
    proto.write_message_begin(name, mtype, 1)
    proto.write_struct(obj)
    proto.write_message_end()
    return bytes(buf.getvalue())


# -- Apache Thrift's fastbinary, fed thriftpy2's specs translated once ---------------------------


def apache_spec(cls: Any, cache: dict[Any, Any]) -> tuple[Any, ...]:
    """Apache's ``thrift_spec`` tuple for a thriftpy2 struct class."""
    if cls in cache:
        return cache[cls]  # type: ignore[no-any-return]
    fields = cls.thrift_spec
    spec: list[Any] = [None] * (max(fields, default=0) + 1)
    for fid, f in fields.items():
        ttype, name = f[0], f[1]
        arg = f[2] if len(f) == 4 else None
        wire, args = apache_type(ttype, arg, cache)
        spec[fid] = (fid, wire, name, args, None)
    cache[cls] = tuple(spec)
    return cache[cls]  # type: ignore[no-any-return]


def apache_type(ttype: int, arg: Any, cache: dict[Any, Any]) -> tuple[int, Any]:
    def elem(a: Any) -> tuple[int, Any]:
        return apache_type(a, None, cache) if isinstance(a, int) else apache_type(a[0], a[1], cache)

    if ttype == TType.BINARY:
        return TType.STRING, "BINARY"
    if ttype == TType.STRING:
        return TType.STRING, "UTF8"
    if ttype in (TType.LIST, TType.SET):
        et, ea = elem(arg)
        return ttype, (et, ea, False)
    if ttype == TType.MAP:
        kt, ka = elem(arg[0])
        vt, va = elem(arg[1])
        return ttype, (kt, ka, vt, va, False)
    if ttype == TType.STRUCT:
        return ttype, [arg, apache_spec(arg, cache)]
    return ttype, None


class Apache:
    """Decoding and encoding through ``thrift.protocol.fastbinary``."""

    def __init__(self) -> None:
        from thrift.protocol import TBinaryProtocol, TCompactProtocol, fastbinary
        from thrift.transport.TTransport import TMemoryBuffer

        self.fb = fastbinary
        self.TMemoryBuffer = TMemoryBuffer
        self.binary = TBinaryProtocol.TBinaryProtocolAccelerated
        self.compact = TCompactProtocol.TCompactProtocolAccelerated
        self.cache: dict[Any, Any] = {}

    def decode(self, protocol: str, data: bytes, cls: Any) -> Any:
        trans = self.TMemoryBuffer(data)
        iprot = (self.binary if protocol == "binary" else self.compact)(trans)
        iprot.readMessageBegin()
        obj = cls()
        spec = [cls, apache_spec(cls, self.cache)]
        iprot._fast_decode(obj, iprot, spec)
        return obj

    def encode(self, protocol: str, name: str, obj: Any) -> bytes:
        trans = self.TMemoryBuffer()
        oprot = (self.binary if protocol == "binary" else self.compact)(trans)
        oprot.writeMessageBegin(name, REPLY, 1)
        spec = [type(obj), apache_spec(type(obj), self.cache)]
        fn = self.fb.encode_binary if protocol == "binary" else self.fb.encode_compact
        trans.write(fn(obj, spec))
        return bytes(trans.getvalue())


# -- the runs ----------------------------------------------------------------------------------


def best_of(fns: dict[str, Callable[[], Any]], number: int, repeat: int) -> dict[str, float]:
    """µs per call of each function, best of ``repeat`` interleaved runs."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            for _ in range(number):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / number * 1e6)
    return best


TABLE_HEAD = [
    "| call | protocol | kitegreen | thriftpy2 | apache-fastbinary |",
    "|---|---|---:|---:|---:|",
]


def check_same(bench: Any, apache: Apache) -> None:
    """Every codec decodes every request to the same object, and the replies decode back."""
    for protocol, proto_id in PROTOCOLS.items():
        for call, (args, result) in make_calls(bench).items():
            data = tp2_encode(protocol, call, CALL, args)
            name, _, _, pos = _thrift.read_message_begin(proto_id, data, 0, len(data))
            spec = _thrift.compile(type(args))
            ours = _thrift.read_struct(proto_id, data, pos, len(data), spec)
            assert name == call, (protocol, call)
            assert ours == args == apache.decode(protocol, data, type(args)), (protocol, call)
            reply = _thrift.write_message(
                proto_id, call, REPLY, 1, result, _thrift.compile(type(result)), False
            )
            assert reply == tp2_encode(protocol, call, REPLY, result), (protocol, call)


def decode_ours(proto_id: int, data: bytes, spec: _thrift.StructSpec) -> Any:
    _, _, _, pos = _thrift.read_message_begin(proto_id, data, 0, len(data))
    return _thrift.read_struct(proto_id, data, pos, len(data), spec)


def decode_thriftpy2(protocol: str, data: bytes, cls: Any) -> Any:
    proto = tp2_proto(protocol, TCyMemoryBuffer(data))
    proto.read_message_begin()
    obj = cls()
    proto.read_struct(obj)
    return obj


def decode_table(bench: Any, apache: Apache, number: int, repeat: int) -> list[str]:
    rows = list(TABLE_HEAD)
    for call, (args, _) in make_calls(bench).items():
        cls = type(args)
        spec = _thrift.compile(cls)
        for protocol, proto_id in PROTOCOLS.items():
            data = tp2_encode(protocol, call, CALL, args)
            fns = {
                "k": partial(decode_ours, proto_id, data, spec),
                "t": partial(decode_thriftpy2, protocol, data, cls),
                "a": partial(apache.decode, protocol, data, cls),
            }
            t = best_of(fns, number if call != "records" else max(number // 10, 1), repeat)
            rows.append(f"| {call} | {protocol} | {t['k']:.2f} | {t['t']:.2f} | {t['a']:.2f} |")
    return rows


def encode_table(bench: Any, apache: Apache, number: int, repeat: int) -> list[str]:
    rows = list(TABLE_HEAD)
    for call, (_, result) in make_calls(bench).items():
        spec = _thrift.compile(type(result))
        for protocol, proto_id in PROTOCOLS.items():
            fns = {
                "k": partial(_thrift.write_message, proto_id, call, REPLY, 1, result, spec, False),
                "t": partial(tp2_encode, protocol, call, REPLY, result),
                "a": partial(apache.encode, protocol, call, result),
            }
            t = best_of(fns, number if call != "records" else max(number // 10, 1), repeat)
            rows.append(f"| {call} | {protocol} | {t['k']:.2f} | {t['t']:.2f} | {t['a']:.2f} |")
    return rows


def big_messages(bench: Any) -> list[str]:
    """Scan and decode time of valid 16 MiB requests: one string, and small structs."""
    target = 16 * 1024 * 1024
    rows = ["| request | protocol | bytes | scan + decode ms |", "|---|---|---:|---:|"]
    for protocol, proto_id in PROTOCOLS.items():
        one = tp2_encode(protocol, "records", CALL, bench.Bench.records_args(records=[]))
        record = bench.Record(name="r", values=[1, 2, 3], attrs={"k": 1})
        per = len(tp2_encode(protocol, "records", CALL, bench.Bench.records_args(records=[record])))
        count = (target - len(one)) // (per - len(one))
        cases = [
            ("16 MiB string", "echo", bench.Bench.echo_args(msg="y" * (target - 64))),
            (f"{count:,} structs", "records", bench.Bench.records_args(records=[record] * count)),
        ]
        for label, call, args in cases:
            spec = _thrift.compile(type(args))
            data = tp2_encode(protocol, call, CALL, args)
            best = float("inf")
            for _ in range(3):
                gc.collect()
                start = time.perf_counter()
                end = _thrift.scan(proto_id, data, 0, len(data), len(data))
                assert end == len(data)
                decode_ours(proto_id, data, spec)
                best = min(best, time.perf_counter() - start)
            rows.append(f"| {label} | {protocol} | {len(data):,} | {best * 1000:.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20000, help="calls per timed run")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved runs; best kept")
    parser.add_argument("--no-big", action="store_true", help="skip the 16 MiB decodes")
    args = parser.parse_args(argv)
    bench = load_bench()
    apache = Apache()
    check_same(bench, apache)
    print(f"Python {sys.version.split()[0]}; µs per call, best of {args.repeat} runs\n")
    print("Decode (message header + argument struct):\n")
    print("\n".join(decode_table(bench, apache, args.number, args.repeat)))
    print("\nEncode (a whole reply message):\n")
    print("\n".join(encode_table(bench, apache, args.number, args.repeat)))
    if not args.no_big:
        print("\nScan + decode of valid 16 MiB requests (best of 3):\n")
        print("\n".join(big_messages(bench)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
