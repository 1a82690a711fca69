"""The one error type users see.

Anything the user can fix (a missing file, a bad field, a value out of range) raises
:class:`GlotkitError` with a one-line message that names the file, field and value.  The CLI
prints it without a traceback and exits with status 2.
"""


class GlotkitError(Exception):
    """A problem with the user's input, reported as one line; the CLI exits with status 2."""
