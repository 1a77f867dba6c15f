"""Everything between nodes: the gRPC control plane, registration, device sync, recollect.

`node` never imports from here; this package uses node's database and services.
"""
