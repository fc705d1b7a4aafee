"""The two ways a command ends without a traceback. Apart from config.py (which also hands out AmreproError) so
that the method registry, which Config reads, can raise them without importing Config back."""


class AmreproError(Exception):
    """A problem the user can fix: printed as one sentence, exit code 2, never a traceback."""


class NoResult(Exception):
    """The science ran but produced nothing to report (every run diverged): one sentence, exit code 1."""
