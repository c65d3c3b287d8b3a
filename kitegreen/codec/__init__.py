"""Bytes to messages and back, without sockets: wire detection, Thrift codecs, header frames."""
