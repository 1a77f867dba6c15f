"""The repository on disk: safe paths from UIDs and atomic, durable writes."""
