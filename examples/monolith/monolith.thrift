// The Thrift half of the monolith example.
namespace py monolith

service Orders {
    // Returns the message.
    string echo(1: string message),
    // Waits `seconds` (at most 10), then returns the message: a request in flight to drain.
    string slow(1: double seconds, 2: string message),
}
