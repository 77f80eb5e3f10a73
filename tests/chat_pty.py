"""Drive `edgelm chat` through a pseudo-terminal, as a person would: two turns, /stats, an answer
stopped with Ctrl-C, then /exit.

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
    os.execv(edgelm, [edgelm, "chat", "-m", model, "--temp", "0", "-n", "600"])
    # (-n 600: room for the long answer that Ctrl-C cuts below)

seen = b""


def read_until(marker: bytes, timeout: float, start: int | None = None) -> None:
    """Read terminal output until `marker` appears after `start` (default: what was seen so
    far)."""
    global seen
    start = len(seen) if start is None else start
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
# Ctrl-C during a long answer stops it, not the program: the prompt comes back.
os.write(fd, b"/system Count slowly.\r")
read_until(b"> ", 120)
os.write(fd, b"Count from 1 to 500, one number per line.\r")
read_until(b"\n", 120)  # the terminal's echo of the line
# Ctrl-C as soon as the answer starts streaming (an answer lasts far longer than the signal).
echoed = len(seen)
while len(seen) == echoed:
    ready, _, _ = select.select([fd], [], [], 120)
    if not ready:
        sys.exit("no answer streamed")
    seen += os.read(fd, 4096)
os.write(fd, b"\x03")
read_until(b"(stopped)", 120)
read_until(b"> ", 120, start=seen.rindex(b"(stopped)"))
os.write(fd, b"/exit\r")
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
