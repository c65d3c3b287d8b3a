"""Bytes to messages and back, never a socket: wire detection, the compiled Thrift codec
(``_thrift``, binary and compact) and the header protocols.

Nothing here imports :mod:`kitegreen.transport` or does I/O; the transport hands this package
whole messages in memory.
"""
