"""The one exception type slim raises for problems the user can fix; the CLI prints it without a traceback."""


class SlimError(Exception):
    """A user-fixable problem. The message must say what is wrong and how to fix it."""
