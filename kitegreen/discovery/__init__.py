"""Consul: registration, the remote configuration, the client and its backoff."""
