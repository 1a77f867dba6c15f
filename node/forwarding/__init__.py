"""Forwarding: routing decisions (pure), the durable queue, and the senders."""
