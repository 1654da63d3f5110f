"""argparse types for the commands' numeric options.

A value out of range becomes argparse's own usage error (exit 2, `error: argument --seed: ...`) before
any work starts, instead of a traceback from deep inside: numpy refusing a negative seed, `range()` a
zero batch, `socket.bind` a port past 65535. argparse has no bounded number type, hence these.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def bounded(kind: type[int] | type[float], low: float, high: float | None = None) -> Callable[[str], int | float]:
    """A `type=` callable that parses `kind` and refuses values outside [low, high]."""
    words = "an integer" if kind is int else "a number"
    allowed = f">= {low:g}" if high is None else f"from {low:g} to {high:g}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {words} {allowed}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {words} {allowed}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {allowed}"
    return parse


positive_int = bounded(int, 1)
non_negative_int = bounded(int, 0)
non_negative_float = bounded(float, 0.0)
seconds = bounded(float, 1.0)
port_number = bounded(int, 1, 65535)
unit_interval = bounded(float, 0.0, 1.0)
