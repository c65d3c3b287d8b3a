// The benchmark service: an empty call and an echo, the same for every server under test.
namespace py bench

service Bench {
    void ping(),
    string echo(1: string msg),
}
