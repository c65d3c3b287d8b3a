"""Bytes on sockets, no Thrift: listening, accepting, reading whole messages under deadlines,
the set of open connections and how they close."""
