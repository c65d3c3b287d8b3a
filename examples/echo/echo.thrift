// The example service of the README quickstart.
namespace py echo

exception EchoError {
    1: string message,
    2: i32 code,
}

service Echo {
    // Returns the message; raises EchoError for an empty message.
    string echo(1: string message) throws (1: EchoError error),
    // The caller's IP address as the server sees it.
    string whoami(),
    void ping(),
    oneway void notify(1: string message),
}
