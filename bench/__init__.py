"""The storm benchmark: ``make bench`` (``python -m bench``). A command that prints
figures, never a timed test."""
