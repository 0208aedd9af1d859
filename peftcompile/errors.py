"""The one error type users catch: a bad spec, model, argument or file, named with the fix."""

from __future__ import annotations

__all__ = ["AdapterError"]


class AdapterError(ValueError):
    """Bad spec, bad model or bad adapter file; the model and files are left unchanged."""
