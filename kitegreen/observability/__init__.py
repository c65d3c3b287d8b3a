"""What an instance says about itself: events, reports, metrics, the hub watch, the debug
server, logs and the panic log."""
