"""The one exception type for user mistakes: the CLI prints its message and exits 1, no traceback."""


class TuneloopError(Exception):
    """A problem the user can fix; the message names the file/field and the fix."""
