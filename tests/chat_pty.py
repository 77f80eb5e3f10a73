"""Drive `edgelm chat` through a pseudo-terminal, as a person would: two turns, /stats, /exit.

Usage: chat_pty.py EDGELM MODEL. Prints everything the terminal showed; exits non-zero if the
program did not finish in time or failed.
"""
import os
import pty
import select
import sys
import time

edgelm, model = sys.argv[1], sys.argv[2]
pid, fd = pty.fork()
if pid == 0:
    os.execv(edgelm, [edgelm, "chat", "-m", model, "--temp", "0", "-n", "24"])

seen = b""


def read_until(marker: bytes, timeout: float) -> None:
    """Read terminal output until `marker` appears after what was seen so far."""
    global seen
    start = len(seen)
    deadline = time.time() + timeout
    while marker not in seen[start:]:
        left = deadline - time.time()
        if left <= 0:
            sys.stdout.write(seen.decode(errors="replace"))
            sys.exit(f"timed out waiting for {marker!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break


read_until(b"> ", 120)
for line in ["Name a colour.", "/stats", "Name another one.", "/stats"]:
    os.write(fd, line.encode() + b"\r")
    read_until(b"> ", 120)
os.write(fd, b"/exit\r")
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
