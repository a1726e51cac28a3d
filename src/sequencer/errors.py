"""The project's error types: every expected failure (bad input, unusable file, missing package) derives from
`SequencerError`.

`sequencer.cli.main` turns a `SequencerError` into one line on stderr and exit code 2; anything else is a bug and
keeps its traceback. The subclasses also derive from the built-in error of their kind, which callers may catch
instead: `UsageError`, `CheckpointError` and `DatasetError` are `ValueError`s, `MissingDependencyError` is an
`ImportError` (and `sequencer.deploy.ExportCheckError` a `RuntimeError`).
"""

from __future__ import annotations


class SequencerError(Exception):
    """An expected failure caused by the user's input, files or environment, not by a bug."""


class UsageError(SequencerError, ValueError):
    """A flag, argument or input value that cannot work (out of range, unknown name, wrong shape)."""


class CheckpointError(SequencerError, ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


class DatasetError(SequencerError, ValueError):
    """A dataset that cannot be used: a missing or empty folder, an unknown name, an unknown split."""


class MissingDependencyError(SequencerError, ImportError):
    """An optional package that a command needs is not installed; the message names the extra to install."""
