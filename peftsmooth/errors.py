"""User-facing errors: one line on stderr, exit code 2, never a traceback."""

from __future__ import annotations

import sys
from typing import Iterable, NoReturn

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user (config value, path, data). The CLI prints it on one line and exits 2."""


def require(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)


def choice_error(key: str, value: object, allowed: Iterable[object]) -> UserError:
    """The standard 'unknown choice' error: names the key, the bad value and the allowed values."""
    allowed = ", ".join(str(a) for a in sorted(allowed, key=str))
    return UserError(f"{key}={value!s} is not allowed (choose from: {allowed})")


def die(command: str, message: str) -> NoReturn:
    """Print `peftsmooth COMMAND: error: MESSAGE` (`peftsmooth: error: ...` without a command) as one
    line on stderr and exit 2."""
    line = " ".join(str(message).split())
    prefix = f"peftsmooth {command}" if command else "peftsmooth"
    print(f"{prefix}: error: {line}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
