// The shapes of tests/test_budget.py: messages whose decoded objects cost far more memory than
// their bytes (empty structs, one per byte), dense ones that must still be served, and a ping.
namespace py budget

struct Empty {}

struct Small {
    1: i32 id,
}

// A large result inside a struct: the list, or the map, of the values prepare() built.
struct Bundle {
    1: list<Small> items,
    2: map<i32, Small> index,
}

service Budget {
    void ping(),
    i32 count(1: list<Empty> items),
    // Sleeps (cooperatively) holding its arguments, then counts them.
    i32 hold(1: list<Empty> items, 2: double seconds),
    // How many hold() calls are sleeping now, their arguments decoded and held.
    i32 holding(),
    i64 total(1: list<i64> values),
    i32 length(1: string text),
    list<Small> echo(1: list<Small> items),
    // Builds `count` Small structs (cooperatively), kept for bundle().
    void prepare(1: i32 count),
    // The prepared structs in a Bundle: as its list ("list") or its map ("map").
    Bundle bundle(1: string shape),
}
