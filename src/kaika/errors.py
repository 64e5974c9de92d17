"""The one exception type that reaches users as a message instead of a traceback."""


class KaikaError(Exception):
    """A problem the user can fix: bad input, a missing file, a wrong option.

    The CLI prints ``str(error)`` and exits with status 2; library callers catch it like any
    exception. The message says what was wrong, where, and what to do.
    """


def require_extra(extra: str, modules: tuple[str, ...], what: str) -> None:
    """Fail with the install command, before any work, when an optional extra is not installed."""
    import importlib.util

    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a broken install
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise KaikaError(
            f"{what} needs the {extra} extra ({', '.join(missing)} not installed): "
            f"pip install 'kaika[{extra}]'"
        )
