"""The one exception type for problems a user can fix, and how a layer's failure is named."""

import contextlib


class UserError(Exception):
    """Bad input, an impossible request, a missing provider.

    The message is one line that says what is wrong and what to do; the CLI
    prints it without a traceback and exits 2.
    """


@contextlib.contextmanager
def about_layer(name: str):
    """Tag an exception escaping from one layer's work with the layer's name, so the one-line
    error can name it and suggest `--exclude NAME`."""
    try:
        yield
    except Exception as exc:
        if not hasattr(exc, "denseflex_layer"):
            exc.denseflex_layer = name
        raise
