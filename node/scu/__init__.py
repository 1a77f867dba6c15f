"""Associations the node requests: sending stored instances (forwarding, C-MOVE and C-GET
sub-operations), echo, ping and query (C-FIND)."""
