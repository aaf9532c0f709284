"""Flower ClientApp: one device's local state, DP training and on-device evaluation."""
