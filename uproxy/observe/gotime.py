"""Go's `time.Time.String()`, which kube-proxy's /healthz prints and its consumers parse.

Layout "2006-01-02 15:04:05.999999999 -0700 MST": nanoseconds with trailing zeros (and a bare
dot) dropped, then, for a time read from a clock, Go's monotonic reading " m=+S.NNNNNNNNN" in
seconds since the process started. Always UTC here (kube-proxy prints its local zone, which is
UTC in its container image). Wall times come as float seconds, exact to about a quarter of a
microsecond today, so they are printed to the microsecond rather than with float noise.
"""

from __future__ import annotations

import time

ZERO_TIME = "0001-01-01 00:00:00 +0000 UTC"  # Go's time.Time{}: never synced


def go_time(wall: float, monotonic_since_start: float | None = None) -> str:
    wall_ns = round(wall * 1e6) * 1000
    seconds, nanos = divmod(wall_ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    text += " +0000 UTC"
    if monotonic_since_start is not None:
        mono_ns = round(monotonic_since_start * 1e9)
        sign = "-" if mono_ns < 0 else "+"
        whole, frac = divmod(abs(mono_ns), 1_000_000_000)
        text += f" m={sign}{whole}.{frac:09d}"
    return text
