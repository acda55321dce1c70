"""The one exception the data layer raises for bad input, so the command line can print it and exit 2."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input: the message is one line naming the problem and the fix."""
