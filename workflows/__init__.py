"""Deterministic workflow code: no I/O, no clock, no randomness outside the SDK's."""
