"""The one exception type that means "the user asked for something we cannot do".

Command-line entry points catch it and print its message as a single line on stderr
with exit code 2, instead of a traceback. Raise it with a message that says what is
wrong *and* how to fix it.
"""


class UserError(Exception):
    """Bad input from the user: a config key, a path, a class name, a prompt..."""
