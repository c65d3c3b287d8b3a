// The benchmark service, the same for every server under test: an empty call, a 1 KB echo, and a
// call carrying a list of 20 structs (a string, a list and a map each) both ways.
namespace py bench

struct Record {
    1: string name,
    2: list<i32> values,
    3: map<string, i64> attrs,
}

service Bench {
    void ping(),
    string echo(1: string msg),
    list<Record> records(1: list<Record> records),
}
