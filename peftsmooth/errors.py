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


def did_you_mean(word: str, options: Iterable[object]) -> str:
    """' (did you mean X?)' for the closest of `options` to a mistyped `word`, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.7)  # 0.6 (difflib's default) offers list for mnist
    return f" (did you mean {close[0]}?)" if close else ""


def choice_error(key: str, value: object, allowed: Iterable[object]) -> UserError:
    """The standard 'unknown choice' error: names the key, the bad value, the closest allowed value (of
    names: spelling says nothing about numbers, 0.12 is not a typo of 0.25) and all of them."""
    allowed = sorted(allowed, key=str)
    numbers = all(is_number(a) for a in allowed)
    hint = "" if numbers else did_you_mean(str(value), allowed).replace("mean ", f"mean {key}=")
    return UserError(f"{key}={value!s} is not allowed{hint} (choose from: {', '.join(str(a) for a in allowed)})")


def is_number(value: object) -> bool:
    """A finite number, or text that reads as one ("0.5")."""
    import math

    try:
        return math.isfinite(float(str(value)))
    except ValueError:
        return False


def die(command: str, message: str) -> NoReturn:
    """Print `peftsmooth COMMAND: error: MESSAGE` (`peftsmooth: error: ...` without a command) as one
    line on stderr and exit 2."""
    line = " ".join(str(message).split())
    prefix = f"peftsmooth {command}" if command else "peftsmooth"
    print(f"{prefix}: error: {line}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
