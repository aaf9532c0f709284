"""Behaviour data: containers, synthetic generator, loaders, splits and per-device partitions."""
