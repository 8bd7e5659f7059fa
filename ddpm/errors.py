"""The one exception type that means "the user asked for something we cannot do", and the
one place a command line turns it into a message.

Raise ``UserError`` with a message that says what is wrong *and* how to fix it; every entry
point is wrapped in ``cli_errors``, which prints that message as a single line on stderr and
returns exit code 2, instead of a traceback.
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input from the user: a config key, a path, a class name, a prompt..."""


def cli_errors(main):
    """Wrap a command's ``main``: its return value (None means 0) is the exit code; a
    ``UserError`` becomes ``error: <message>`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped
