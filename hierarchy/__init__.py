"""Everything between nodes (gRPC control plane, device sync, recollect, refresh-IP).

Empty until the hierarchy issue; `node` must never import from here.
"""
