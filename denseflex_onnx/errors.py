"""The one exception type for problems a user can fix."""


class UserError(Exception):
    """Bad input, an impossible request, a missing provider.

    The message is one line that says what is wrong and what to do; the CLI
    prints it without a traceback and exits 2.
    """
