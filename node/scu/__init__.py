"""Outbound associations (echo today; forwarding will use the same helpers)."""
