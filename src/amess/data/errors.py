"""The data layer's error type (its own module so that every data module can raise it)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing input data; the message names the file, the sample and what was expected."""
