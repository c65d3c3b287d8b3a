// Fields with mutable defaults, for tests/test_codec_safety.py: a message that lacks them must
// not hand every request the same list, map, set or struct.
namespace py defaults

struct Point {
    1: i32 x = 1,
    2: list<i32> tags = [7],
}

struct WithDefaults {
    1: list<i32> numbers = [1, 2],
    2: map<string, i32> counts = {"a": 1},
    3: set<string> names = ["n"],
    4: Point point = {"x": 3},
    5: string text = "t",
    6: i32 number = 5,
}

service Defaults {
    WithDefaults echo(1: WithDefaults value = {"numbers": [9]}),
}
