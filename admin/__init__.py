"""Operator commands: create API clients and their keys."""
