"""The local stack: every real component, started and supervised by one command."""
