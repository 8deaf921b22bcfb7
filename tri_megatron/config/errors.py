"""The one error type of configuration: a bad flag combination, reported as one line naming the flag and
the fix before anything is built or written (``pretrain_tri.py`` turns it into exit code 2)."""


class ArgumentError(ValueError):
    """A bad flag combination, reported as one line before anything is built or written."""
