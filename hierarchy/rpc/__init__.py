"""Code generated from protos/ by scripts/generate_protos.py (checked to be current in CI)."""
