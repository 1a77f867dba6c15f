"""What happens to a received instance, however it arrived (a C-STORE, `pacsnode import`):
checked, coerced, written durably, indexed and queued for forwarding (`pipeline.Ingest`), under
the partition and device it came in for (`lookup`)."""
