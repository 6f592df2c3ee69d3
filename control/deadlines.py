"""Deadlines as arguments: every wait in embxfer takes a finite number of seconds.

One check for the whole package (the ring, the zmq link, the runtime's groups and
endpoints), so NaN, infinities, negatives, booleans and non-numbers are refused the same
way everywhere, with a message that names the argument and the value.
"""

from __future__ import annotations

import math
import numbers


def check_seconds(name: str, value: object, *, positive: bool = False) -> float:
    """`value` as float seconds if finite and >= 0 (> 0 with `positive`); else ValueError
    naming `name` and the value."""
    if type(value) is float and 0.0 <= value < math.inf and (value > 0.0 or not positive):
        return value  # the common case, without the generic checks below (nan fails them all)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float
            seconds = math.inf
        if 0.0 <= seconds < math.inf and (seconds > 0.0 or not positive):
            return seconds
    raise ValueError(f"{name}={value!r}: expected a finite number of seconds {'> 0' if positive else '>= 0'}")
