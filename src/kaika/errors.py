"""The one exception type that reaches users as a message instead of a traceback."""


class KaikaError(Exception):
    """A problem the user can fix: bad input, a missing file, a wrong option.

    The CLI prints ``str(error)`` and exits with status 2; library callers catch it like any
    exception. The message says what was wrong, where, and what to do.
    """
