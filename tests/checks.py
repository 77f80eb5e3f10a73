"""The runner the Python check scripts of tests/ share: `@check` registers a check, `main()`
runs them in order, prints one line per check, and exits non-zero if any failed."""

import sys
import time
import traceback

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def main():
    failed = 0
    for fn in CHECKS:
        t0 = time.time()
        try:
            fn()
            print(f"ok   {fn.__name__} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {fn.__name__}:\n{traceback.format_exc()}", flush=True)
    print(f"{len(CHECKS) - failed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)
