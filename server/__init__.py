"""Flower ServerApp: round loop, reply validation, aggregation, checkpoints and run records."""
