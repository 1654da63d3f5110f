"""argparse types for the commands' numeric options, from the bounded number types of params.yaml.

A value out of range becomes argparse's own usage error (exit 2, `error: argument --seed: -1 is out of
range (must be >= 0)`) before any work starts, instead of a traceback from deep inside: numpy refusing a
negative seed, `range()` a zero batch, `socket.bind` a port past 65535. The ranges are
`psyface.config`'s (`PositiveInt`, `UnitFloat`...), so a number means the same on the command line as in
params.yaml; argparse itself has no bounded number type.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Annotated, Any, get_args

from psyface.config import Bound, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, UnitFloat


def argument_type(hint: Any) -> Callable[[str], int | float]:
    """A `type=` callable for a bounded number type `Annotated[int | float, Bound(...)]`."""
    kind, bound = get_args(hint)[:2]

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or not bound.allows(value):
            raise argparse.ArgumentTypeError(f"{value!r} is out of range ({bound.describe()})")
        return value

    return parse


positive_int = argument_type(PositiveInt)
non_negative_int = argument_type(NonNegativeInt)
non_negative_float = argument_type(NonNegativeFloat)
seconds = argument_type(PositiveFloat)
unit_interval = argument_type(UnitFloat)
port_number = argument_type(Annotated[int, Bound(1, 65535)])
