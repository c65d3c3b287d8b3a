"""The compiled codec stays memory-safe when the Python objects it encodes, or the classes it
compiles, run code that changes what is being walked, and it refuses values of the wrong type.

The tests of the first kind are reproducers: against a codec that kept borrowed references across
calls into Python, each one read or wrote freed or out-of-bounds memory (AddressSanitizer's
heap-use-after-free or heap-buffer-overflow under ``tox -e asan``; a crash or garbage in a normal
build). Here they assert what happens instead: an error, or a message built from a snapshot.
"""

from __future__ import annotations

import array
import enum
import sys
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import pytest
import thriftpy2
from clients import thriftpy2_client
from conftest import TESTS, assert_no_leak, testsvc_thrift
from thriftpy2.thrift import TApplicationException, TType

from kitegreen.codec import _thrift

codec_thrift = thriftpy2.load(str(TESTS / "idl" / "codec.thrift"), module_name="codec_thrift")
defaults_thrift = thriftpy2.load(
    str(TESTS / "idl" / "defaults.thrift"), module_name="defaults_thrift"
)
All, Leaf, Node = codec_thrift.All, codec_thrift.Leaf, codec_thrift.Node
AllArgs = codec_thrift.Codec.all_args
PROTOCOLS = {"binary": _thrift.BINARY, "compact": _thrift.COMPACT}
CALL = 1

pytestmark = pytest.mark.timeout(60)


def write(protocol: str, obj: Any, framed: bool = False) -> bytes:
    spec = _thrift.compile(type(obj))
    return _thrift.write_message(PROTOCOLS[protocol], "all", CALL, 1, obj, spec, framed)


def read(protocol: str, data: bytes, cls: Any = AllArgs) -> Any:
    proto = PROTOCOLS[protocol]
    _, _, _, pos = _thrift.read_message_begin(proto, data, 0, len(data))
    return _thrift.read_struct(proto, data, pos, len(data), _thrift.compile(cls))


def read_args(protocol: str, data: bytes, cls: Any) -> tuple[Any, ...]:
    proto = PROTOCOLS[protocol]
    _, _, _, pos = _thrift.read_message_begin(proto, data, 0, len(data))
    return _thrift.read_args(proto, data, pos, len(data), _thrift.compile(cls))  # type: ignore[no-any-return]


def round_trip(protocol: str, value: Any) -> Any:
    return read(protocol, write(protocol, AllArgs(value=value))).value


class Hooked(Leaf):
    """A Leaf whose ``s`` is a property: reading it (as the encoder does) runs ``hook``."""

    def __init__(self, hook: Any, **kwargs: Any) -> None:
        self.hook = hook
        super().__init__(**kwargs)

    @property
    def s(self) -> str:
        self.hook()
        return "hooked"

    @s.setter
    def s(self, value: Any) -> None:
        pass


# -- borrowed references across calls into Python ---------------------------------------------


@pytest.mark.parametrize("protocol", ["binary", "compact"])
class TestContainersChangedWhileEncoded:
    def test_list_emptied_by_an_elements_property(self, protocol):
        """The encoder held the list's items by borrowed pointers: emptying the list freed the
        elements still to come (use after free at enc_list)."""
        leaves: list[Any] = []
        leaves.extend([Hooked(leaves.clear), Leaf(s="a" * 100), Leaf(s="b" * 100)])
        with pytest.raises(RuntimeError, match="leaves: the list changed size"):
            write(protocol, AllArgs(value=All(leaves=leaves)))

    def test_list_grown_by_an_elements_property(self, protocol):
        """Growing the list moved its item array: the old one was read after it was freed."""
        leaves: list[Any] = []
        grow = lambda: leaves.extend(Leaf(s=str(i)) for i in range(1000))  # noqa: E731
        leaves.extend([Hooked(grow), Leaf(s="a")])
        with pytest.raises(RuntimeError, match="leaves: the list changed size"):
            write(protocol, AllArgs(value=All(leaves=leaves)))

    def test_list_emptied_by_a_nested_containers_iter(self, protocol):
        """A set subclass's __iter__ (list<list<i64>> takes a set for the inner list) is Python
        code too."""
        outer: list[Any] = []

        class Emptying(set[int]):
            def __iter__(self) -> Iterator[int]:
                outer.clear()
                return super().__iter__()

        outer.extend([Emptying({1}), [2**40] * 50, [3] * 50])
        with pytest.raises(RuntimeError, match="nested: the list changed size"):
            write(protocol, AllArgs(value=All(nested=outer)))

    def test_truth_hooks_are_never_called(self, protocol):
        """list<bool> takes bools only: an object's __bool__ (which emptied the list) never
        runs."""
        bools: list[Any] = []
        calls = []

        class Truthy:
            def __bool__(self) -> bool:
                calls.append(1)
                bools.clear()
                return True

        bools.extend([Truthy(), True, False])
        with pytest.raises(TypeError, match="bools: expected a bool, got Truthy"):
            write(protocol, AllArgs(value=All(bools=bools)))
        assert (calls, len(bools)) == ([], 3)

    def test_dict_grown_by_a_values_property(self, protocol):
        """A map's dict changed by encoding one of its values is an error, not a message whose
        count disagrees with its entries."""
        by_name: dict[str, Any] = {}
        by_name["a"] = Hooked(lambda: by_name.update({str(i): Leaf() for i in range(100)}))
        by_name["b"] = Leaf(s="b")
        with pytest.raises(RuntimeError, match="leaves_by_name: the dict changed size"):
            write(protocol, AllArgs(value=All(leaves_by_name=by_name)))

    def test_dict_changed_without_changing_size(self, protocol):
        """A key replaced by another keeps the size: the message still has as many entries as
        its header says, each a key and value that were in the dict."""
        by_name: dict[str, Any] = {}

        def swap() -> None:
            by_name.pop("b", None)
            by_name["c"] = Leaf(s="c")

        by_name.update(a=Hooked(swap), b=Leaf(s="b"))
        back = round_trip(protocol, All(leaves_by_name=by_name)).leaves_by_name
        assert len(back) == 2
        assert back["a"].s == "hooked"

    def test_mapping_whose_items_list_is_emptied(self, protocol):
        """A mapping's items() may return a list the mapping keeps: the encoder works on its
        own copy, so emptying that list while a value is encoded changes nothing."""

        class Kept(Mapping[str, Any]):
            def __init__(self) -> None:
                self.pairs: list[tuple[str, Any]] = []

            def items(self) -> Any:
                return self.pairs

            def __getitem__(self, key: str) -> Any:
                return dict(self.pairs)[key]

            def __iter__(self) -> Iterator[str]:
                return iter(dict(self.pairs))

            def __len__(self) -> int:
                return len(self.pairs)

        kept = Kept()
        kept.pairs.extend(
            [("a", Hooked(kept.pairs.clear)), ("b", Leaf(s="b" * 100)), ("c", Leaf(s="c"))]
        )
        back = round_trip(protocol, All(leaves_by_name=kept)).leaves_by_name
        assert {k: v.s for k, v in back.items()} == {"a": "hooked", "b": "b" * 100, "c": "c"}


class TestCompileSnapshots:
    def test_thrift_spec_grown_while_compiled(self):
        """Compiling a struct field looks up the struct class's thrift_spec, which may be a
        property that grows the spec being compiled: the fields array was sized before and
        written past its end (heap overflow at compile_spec). The spec as it was is compiled."""
        grown: dict[int, Any] = {}

        class GrowsOuter(type):
            @property
            def thrift_spec(cls) -> dict[int, Any]:
                grown.update({fid: (TType.I32, f"f{fid}", False) for fid in range(2, 300)})
                return {1: (TType.I32, "x", False)}

        class Inner(metaclass=GrowsOuter):
            def __init__(self, x: Any = None) -> None:
                self.x = x

        class Outer:
            thrift_spec = grown

            def __init__(self, inner: Any = None) -> None:
                self.inner = inner

        grown[1] = (TType.STRUCT, "inner", Inner, False)
        spec = _thrift.compile(Outer)
        assert repr(spec).endswith("1 fields>")
        data = _thrift.write_message(_thrift.BINARY, "m", CALL, 1, Outer(Inner(7)), spec, False)
        assert read("binary", data, Outer).inner.x == 7

    def test_default_spec_emptied_by_a_name_comparison(self):
        """The field names are compared with default_spec's; a str subclass's __eq__ emptying
        default_spec freed the pairs still to be read."""

        class Holder:
            thrift_spec: ClassVar = {1: (TType.I32, "a", False), 2: (TType.I32, "b", False)}

            def __init__(self, a: Any = None, b: Any = None) -> None:
                self.a, self.b = a, b

        class Name(str):
            __hash__ = str.__hash__

            def __eq__(self, other: object) -> bool:
                Holder.default_spec.clear()
                return str.__eq__(self, other)

        Holder.default_spec = [(Name("a"), None), (Name("b"), 4)]  # type: ignore[attr-defined]
        spec = _thrift.compile(Holder)
        data = _thrift.write_message(_thrift.BINARY, "m", CALL, 1, Holder(a=1), spec, False)
        back = read("binary", data, Holder)
        assert (back.a, back.b) == (1, 4)


class TestCompileRetry:
    def test_a_spec_that_failed_compiles_once_its_classes_are_complete(self):
        """A struct compiled before the class it names has a thrift_spec fails, and compiles
        on a later try; a spec compiled meanwhile that points at it works then too."""

        class Later:
            def __init__(self, x: Any = None) -> None:
                self.x = x

        class First:
            def __init__(self, second: Any = None, later: Any = None) -> None:
                self.second, self.later = second, later

        class Second:
            thrift_spec: ClassVar = {1: (TType.STRUCT, "first", First, False)}

            def __init__(self, first: Any = None) -> None:
                self.first = first

        First.thrift_spec = {  # type: ignore[attr-defined]
            1: (TType.STRUCT, "second", Second, False),
            2: (TType.STRUCT, "later", Later, False),
        }
        for _ in range(2):
            with pytest.raises(AttributeError, match="thrift_spec"):
                _thrift.compile(First)
        second = _thrift.compile(Second)  # compiled while First was: it points at First
        value = Second(First(later=Later(5)))
        with pytest.raises(TypeError, match="cannot compile"):
            _thrift.write_message(_thrift.BINARY, "m", CALL, 1, value, second, False)

        Later.thrift_spec = {1: (TType.I32, "x", False)}  # type: ignore[attr-defined]
        _thrift.compile(First)
        data = _thrift.write_message(_thrift.BINARY, "m", CALL, 1, value, second, False)
        assert read("binary", data, Second).first.later.x == 5


# -- defaults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["binary", "compact"])
class TestMutableDefaults:
    def test_each_message_gets_its_own_default_containers(self, protocol):
        """A field absent from the wire gets its IDL default; changing one message's default
        list, map, set or struct changes no other message's, nor the IDL's."""
        cls = defaults_thrift.WithDefaults
        empty = write(protocol, _strip(cls()))
        first, second = read(protocol, empty, cls), read(protocol, empty, cls)
        first.numbers.append(3)
        first.counts["b"] = 2
        first.names.add("m")
        first.point.tags.append(8)
        assert second.numbers == [1, 2]
        assert second.counts == {"a": 1}
        assert second.names == {"n"}
        assert (second.point.x, second.point.tags) == (3, [7])
        assert dict(cls.default_spec)["numbers"] == [1, 2]
        assert (second.text, second.number) == ("t", 5)

    def test_each_call_gets_its_own_default_argument(self, protocol):
        """The handler's arguments (read_args) too: a default struct argument is fresh."""
        args_cls = defaults_thrift.Defaults.echo_args
        empty = write(protocol, _strip(args_cls()))
        (first,) = read_args(protocol, empty, args_cls)
        (second,) = read_args(protocol, empty, args_cls)
        first.numbers.append(10)
        assert second.numbers == [9]
        assert first is not second


def _strip(obj: Any) -> Any:
    for name, _ in type(obj).default_spec:
        setattr(obj, name, None)
    return obj


# -- strict encoding ----------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 1


class Buffered(bytearray):
    """A bytearray subclass whose __buffer__ (Python 3.12+) runs code: the value's bytes are
    what the buffer protocol gives."""

    def __buffer__(self, flags: int) -> memoryview:
        self.calls = getattr(self, "calls", 0) + 1
        return memoryview(b"from __buffer__")


class Raising(bytearray):
    def __buffer__(self, flags: int) -> memoryview:
        raise ValueError("no buffer today")


@pytest.mark.parametrize("protocol", ["binary", "compact"])
class TestStrictTypes:
    @pytest.mark.parametrize(
        ("value", "words"),
        [
            (All(flag="false"), "flag: expected a bool, got str"),
            (All(flag=1), "flag: expected a bool, got int"),
            (All(flag=[]), "flag: expected a bool, got list"),
            (All(bools=[True, 0]), "bools: expected a bool, got int"),
            (All(real=True), "real: expected a float for double, got bool"),
            (All(int32=True), "int32: expected an int for i32, got bool"),
            (All(tiny=False), "tiny: expected an int for byte, got bool"),
            (All(int64=True), "int64: expected an int for i64, got bool"),
            (All(ints=bytearray(b"\x01\x02")), "ints: expected a list, set or tuple"),
            (All(ints=range(3)), "ints: expected a list, set or tuple"),
            (All(ints=iter([1, 2])), "ints: expected a list, set or tuple"),
            (All(names={"a": 1}.keys()), "names: expected a list, set or tuple"),
            (All(text=array.array("b", b"ab")), "text: expected str or bytes, got array"),
            (All(blob=7), "blob: expected str or bytes, got int"),
            (All(leaves_by_name="ab"), "leaves_by_name: expected a dict"),
            (All(leaves_by_name=b"ab"), "leaves_by_name: expected a dict"),
        ],
    )
    def test_a_value_of_the_wrong_type_is_refused(self, protocol, value, words):
        """What thriftpy2 would convert (any truth value for a bool, True for a number, any
        iterable for a list) is an error naming the field."""
        with pytest.raises(TypeError, match=words):
            write(protocol, AllArgs(value=value))

    def test_what_each_type_takes(self, protocol):
        """The types each Thrift type does take: int subclasses (IntEnum) for integers, an int
        for a double, str or bytes-like for strings and binary, any list/tuple/set/frozenset,
        a frozenset of strings for a set."""
        value = All(
            flag=False,
            tiny=Color.RED,
            int32=Color.RED,
            real=2**53,
            text=b"bytes",
            blob="text",
            ints=(1, 2),
            names=frozenset({"x"}),
            nested=[{3}, (4,)],
            leaves=(Leaf(s=bytearray(b"ba"), b=memoryview(b"mv")),),
            reals={1: 1},
        )
        back = round_trip(protocol, value)
        assert back.flag is False
        assert (back.tiny, back.int32, back.real) == (1, 1, float(2**53))
        assert (back.text, back.blob) == ("bytes", b"text")
        assert (back.ints, back.names, back.nested) == ([1, 2], ["x"], [[3], [4]])
        assert (back.leaves[0].s, back.leaves[0].b) == ("ba", b"mv")
        assert back.reals == {1: 1.0}

    def test_an_int_subclass_float_hook_is_not_called(self, protocol):
        """A double reads an int subclass's value, not its __float__."""

        class Odd(int):
            def __float__(self) -> float:
                raise AssertionError("__float__ called")

        assert round_trip(protocol, All(real=Odd(3))).real == 3.0

    def test_a_buffer_hook_is_honoured_or_its_error_passed_on(self, protocol):
        """A bytearray subclass defining __buffer__ (3.12+): the bytes it gives are encoded,
        and its exception is the encoder's. (Before 3.12 __buffer__ is an ordinary method.)"""
        hooked = Buffered(b"own bytes")
        back = round_trip(protocol, All(blob=hooked, text=Buffered(b"x")))
        if sys.version_info >= (3, 12):
            assert (back.blob, back.text) == (b"from __buffer__", "from __buffer__")
            assert hooked.calls == 1
            with pytest.raises(ValueError, match="no buffer today"):
                write(protocol, AllArgs(value=All(blob=Raising(b"r"))))
        else:
            assert (back.blob, back.text) == (b"own bytes", "x")
            assert round_trip(protocol, All(blob=Raising(b"r"))).blob == b"r"

    def test_a_buffer_hook_that_empties_the_list_being_encoded(self, protocol):
        """__buffer__ is Python code inside the encoder like any other (3.12+)."""
        leaves: list[Any] = []

        class Emptying(bytearray):
            def __buffer__(self, flags: int) -> memoryview:
                leaves.clear()
                return memoryview(b"e")

        leaves.extend([Leaf(b=Emptying(b"e")), Leaf(s="a" * 100), Leaf(s="b")])
        if sys.version_info >= (3, 12):
            with pytest.raises(RuntimeError, match="leaves: the list changed size"):
                write(protocol, AllArgs(value=All(leaves=leaves)))
        else:
            assert len(round_trip(protocol, All(leaves=leaves)).leaves) == 3


@pytest.mark.parametrize("protocol", ["binary", "compact"])
class TestAttributes:
    def test_a_missing_attribute_is_an_unset_field(self, protocol):
        """As thriftpy2 does, a struct without the attribute at all writes no field."""
        value = All(int32=4, text="x")
        del value.text
        back = round_trip(protocol, value)
        assert (back.int32, back.text) == (4, None)

    def test_an_attribute_error_from_a_property_is_passed_on(self, protocol):
        """A property that raises AttributeError is a bug in the handler's class, not an
        unset field: thriftpy2 would silently drop the field."""

        class Broken(Leaf):
            @property
            def s(self) -> str:
                return self.no_such_attribute  # type: ignore[attr-defined,no-any-return]

            @s.setter
            def s(self, value: Any) -> None:
                pass

        with pytest.raises(AttributeError, match="no_such_attribute"):
            write(protocol, AllArgs(value=All(leaf=Broken())))


class TestMessageLimits:
    @pytest.mark.parametrize("fid", [2**32, 2**32 + 1, 2**15, -(2**15) - 1, 2**63 - 1])
    def test_a_result_field_id_outside_i16_is_refused(self, fid):
        """write_result's field id was cast to an int: 2**32 became 0, the success field."""
        spec = _thrift.compile(testsvc_thrift.TestService.add_result)
        with pytest.raises(OverflowError, match="not an i16"):
            _thrift.write_result(_thrift.BINARY, "add", 2, 1, fid, 5, spec, False)

    def test_a_result_field_id_in_range_still_works(self):
        spec = _thrift.compile(testsvc_thrift.TestService.add_result)
        data = _thrift.write_result(_thrift.BINARY, "add", 2, 1, 0, 5, spec, False)
        assert read("binary", data, testsvc_thrift.TestService.add_result).success == 5


def test_a_wrong_type_from_a_handler_is_internal_error(make_server, handler, monkeypatch):
    """Over a real server: a handler's bool for an i32, or bytearray for a list<string>, is
    INTERNAL_ERROR "result does not match the IDL", as an out-of-range i32 is; the connection
    serves on."""
    monkeypatch.setattr(handler, "add", lambda a, b: a == b)
    monkeypatch.setattr(
        handler, "roundtrip", lambda item: testsvc_thrift.Item(id=1, tags=bytearray(b"ab"))
    )
    server = make_server()
    with thriftpy2_client(testsvc_thrift.TestService, server.address) as client:
        for call in (lambda: client.add(1, 1), lambda: client.roundtrip(testsvc_thrift.Item())):
            with pytest.raises(TApplicationException) as info:
                call()
            assert info.value.type == TApplicationException.INTERNAL_ERROR
            assert "result does not match the IDL" in info.value.message
        assert client.echo("next") == "next"


@pytest.mark.slow
def test_no_leaks_on_the_new_paths():
    """The refusals and copies above leave no memory behind (tracemalloc over 2000 rounds)."""
    cls = defaults_thrift.WithDefaults
    empty = write("binary", _strip(cls()))

    def work() -> None:
        leaves: list[Any] = []
        leaves.extend([Hooked(leaves.clear), Leaf(s="a"), Leaf(s="b")])
        by_name: dict[str, Any] = {}
        by_name["a"] = Hooked(lambda: by_name.update(x=Leaf()))
        for value, error in (
            (All(leaves=leaves), RuntimeError),
            (All(leaves_by_name=by_name), RuntimeError),
            (All(flag="false"), TypeError),
            (All(ints=bytearray(b"ab")), TypeError),
            (All(real=True), TypeError),
        ):
            with pytest.raises(error):
                write("compact", AllArgs(value=value))
        write("binary", AllArgs(value=All(reals={1: 1}, ints=(1, 2), names={"a"})))
        read("binary", empty, cls)
        read_args("binary", empty, defaults_thrift.Defaults.echo_args)

    assert_no_leak(work, settle=300)
