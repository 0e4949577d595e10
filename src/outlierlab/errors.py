"""Typed errors. Every user-facing mistake raises a subclass of :class:`OutlierlabError`
with a one-line message naming what is wrong and what is allowed; the CLI prints it and
exits with status 2."""

from __future__ import annotations


class OutlierlabError(Exception):
    """Base of every error outlierlab raises on purpose."""


class ConfigError(OutlierlabError, ValueError):
    """An invalid config field, preset, override or combination of options."""


class DataError(OutlierlabError, ValueError):
    """Missing, empty or malformed data, corpus or tokenizer."""


class ModelLoadError(OutlierlabError, ValueError):
    """A model folder or checkpoint that is missing, tampered with or unsupported."""


class CheckpointError(OutlierlabError):
    """A checkpoint that cannot be written, read or resumed from."""
