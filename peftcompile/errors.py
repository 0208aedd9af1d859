"""The one error type users catch: a bad spec, model, argument or file, named with the fix."""

from __future__ import annotations

__all__ = ["AdapterError", "AdapterTypeError", "AdapterWarning"]


class AdapterError(ValueError):
    """Bad spec, bad model or bad adapter file; the model and files are left unchanged."""


class AdapterTypeError(AdapterError, TypeError):
    """An argument of the wrong type (also a TypeError, for callers that catch that)."""


class AdapterWarning(UserWarning):
    """peftcompile carried on, with a correct result, but something deserves attention."""
