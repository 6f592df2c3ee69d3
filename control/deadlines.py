"""Deadlines as arguments: every wait in embxfer takes a finite number of seconds.

One check for the whole package (the ring, the zmq link, the runtime's groups and
endpoints), so NaN, infinities, negatives, booleans and non-numbers are refused the same
way everywhere, with a message that names the argument and the value.

`check_timeout` is the stricter check for a timeout someone configures (the runtime's
`connect(timeout_s=...)`, `Config`'s seconds): between MIN_TIMEOUT_S and MAX_TIMEOUT_S.
"""

from __future__ import annotations

import math
import numbers

# Below a millisecond a timeout expires before one poll of a ring or a link has run: a
# unit mistake (microseconds for seconds), not a wish.
MIN_TIMEOUT_S = 1e-3
# Above a week it is a typo (an extra digit, milliseconds for seconds), and on the way
# to what the calls under a wait refuse: posix_ipc overflows its timespec on very long
# semaphore waits (ring.py waits in pieces of a day), threading.TIMEOUT_MAX is 292 years
# and an int64 count of nanoseconds ends there too.
MAX_TIMEOUT_S = 7 * 86400.0


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


def check_timeout(name: str, value: object) -> float:
    """`value` as float seconds if a number (not a bool) in [MIN_TIMEOUT_S, MAX_TIMEOUT_S]
    (1 ms .. 1 week); else ValueError naming `name`, the value and the bounds."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:  # NaN fails both comparisons
            return seconds
    raise ValueError(f"{name}={value!r}: expected a finite number of seconds from {MIN_TIMEOUT_S:g} (1 ms) "
                     f"to {MAX_TIMEOUT_S:g} (1 week)")
