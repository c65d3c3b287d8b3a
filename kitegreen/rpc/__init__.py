"""Thrift calls over connections: the method table, the request loop, panics."""
