"""The index database: models, engine/session handling and migrations."""
