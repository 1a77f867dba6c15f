"""The node's decisions, as pure functions over plain values: who is admitted, what a rule
changes, which studies match, where an instance is forwarded, what auto-purge deletes, which
transfer syntax is accepted, whether a connection may start its handshake.

Nothing here does I/O: no socket, database session, file or association (the import contract
in pyproject.toml forbids those imports); the callers that do I/O pass the values in.
"""
