// The shapes of tests/test_budget.py: messages whose decoded objects cost far more memory than
// their bytes (empty structs, one per byte), dense ones that must still be served, and a ping.
namespace py budget

struct Empty {}

struct Small {
    1: i32 id,
}

service Budget {
    void ping(),
    i32 count(1: list<Empty> items),
    // Sleeps (cooperatively) holding its arguments, then counts them.
    i32 hold(1: list<Empty> items, 2: double seconds),
    i64 total(1: list<i64> values),
    i32 length(1: string text),
    list<Small> echo(1: list<Small> items),
}
