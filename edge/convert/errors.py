"""The one error type of the conversion: its message is a single line naming the problem and the file."""
from __future__ import annotations


class ConversionError(Exception):
    """A conversion problem worded for the user (the CLI prints it as one line)."""
