// Every Thrift type the codec handles, for tests/test_codec.py.
namespace py codec

enum Color {
    RED = 1,
    GREEN = 2,
}

struct Leaf {
    1: string s,
    2: binary b,
}

struct All {
    1: bool flag,
    2: byte tiny,
    3: i16 short_int,
    4: i32 int32,
    5: i64 int64,
    6: double real,
    7: string text,
    8: binary blob,
    9: list<i32> ints,
    10: set<string> names,
    11: map<string, Leaf> leaves_by_name,
    12: list<list<i64>> nested,
    13: map<i32, list<bool>> flags,
    14: Color color,
    15: optional Leaf leaf,
    16: list<Leaf> leaves,
    17: string with_default = "dflt",
    18: list<bool> bools,
    19: map<i16, double> reals,
    300: i32 far,
}

struct Node {
    1: i32 value,
    2: optional Node inner,
    3: list<Node> children,
}

// All's fields as another version of the IDL has them: 7 has another type, 9 and 11 other
// element types, the rest are unknown. (Not map<i32, ...> for 11: thriftpy2 takes a string key
// type on the wire for any declared key type, and reads a string's length as an i32 key.)
struct Partial {
    4: i32 int32,
    7: i64 text,
    9: list<string> ints,
    11: map<string, i64> leaves_by_name,
}

// Map keys Python cannot hash.
struct Weird {
    1: map<list<i32>, i32> by_list,
}

service Codec {
    All all(1: All value),
    void partial(1: Partial value),
    void weird(1: Weird value),
}
