// The service soak.py hammers: strings, binary, nested structs, containers, declared and
// undeclared exceptions, a result that does not match the IDL, oneway. The same shape as the
// tests' tests/idl/testsvc.thrift, kept here so that the benchmarks import nothing from tests/.
namespace py soaksvc

exception Declared {
    1: string message,
    2: i32 code,
}

struct Item {
    1: i32 id,
    2: string name,
    3: list<string> tags,
    4: map<string, i64> counts,
    5: optional Item child,
}

service TestService {
    void ping(),
    string echo(1: string message),
    binary echo_binary(1: binary data),
    Item roundtrip(1: Item item),
    i32 add(1: i32 a, 2: i32 b),
    // The caller's IP as kitegreen.real_ip() reports it; "" when it is None.
    string client_ip(),
    // Sleeps (cooperatively) then returns the message.
    string slow(1: double seconds, 2: string message),
    void raise_declared(1: string message, 2: i32 code) throws (1: Declared err),
    void raise_undeclared(1: string message),
    // The handler returns a value of the wrong type: the reply cannot be encoded.
    string wrong_return(),
    oneway void notify(1: string tag),
    i32 notified(1: string tag),
    // Keeps the gevent hub busy (CPU, no yield) for the given seconds.
    void block_hub(1: double seconds),
}
