"""Runs a build command (the Makefile's `setup.py build_ext`) and turns ninja's verbose
compiler lines (~1,000 characters each) into one short line per compiled source:

    [ 12/46   4:31] cuda/prefill     fwd_hdim64_bf16.cu

(ninja prints a line when a command finishes, so the count is of finished sources), plus a
"still compiling" line after each minute without one, so a newcomer knows the build is alive.
Every other line passes through unchanged: warnings, setuptools, and on failure ninja's
"FAILED:" line with the whole failing command and the compiler's errors. Exit status: the
command's.

    python3 tools/build.py -- .venv/bin/python setup.py -q build_ext --inplace
Python 3 standard library only.
"""
import os
import re
import subprocess
import sys
import threading
import time

NINJA_LINE = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
SOURCE = re.compile(r"\s-c\s+(\S+\.(?:cu|cpp|cc|c))\b")
HEARTBEAT_S = 60


def elapsed(start):
    seconds = int(time.monotonic() - start)
    return f"{seconds // 60:3d}:{seconds % 60:02d}"


def short_line(match, start, root):
    """'[ n/N  m:ss] family file' for a ninja line; None when it names no source (a link)."""
    done, total, command = match.groups()
    source = SOURCE.search(command)
    if source:
        path = os.path.relpath(source.group(1), root)
        parts = path.split(os.sep)
        family = "/".join(parts[1:-1]) if parts[0] == "csrc" else os.path.dirname(path)
        what = f"{family or '.':<18} {parts[-1]}"
    elif " -shared " in command:
        what = "link attnkit._C"
    else:
        what = command.split()[0] if command.split() else "?"
    return f"[{int(done):3d}/{int(total):3d} {elapsed(start)}] {what}"


def main(argv):
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1:]
    root = os.getcwd()
    start = time.monotonic()
    last_output = [time.monotonic()]
    lock = threading.Lock()
    done = threading.Event()

    def emit(text):
        with lock:
            print(text, flush=True)
            last_output[0] = time.monotonic()

    def heartbeat():
        while not done.wait(5):
            if time.monotonic() - last_output[0] >= HEARTBEAT_S:
                emit(f"[   ...  {elapsed(start)}] still compiling")

    print(f"attnkit build: {' '.join(command)}", flush=True)
    ticker = threading.Thread(target=heartbeat, daemon=True)
    ticker.start()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        line = line.rstrip("\n")
        match = NINJA_LINE.match(line)
        if match:
            emit(short_line(match, start, root))
        elif line.strip():
            emit(line)
    rc = proc.wait()
    done.set()
    print(f"attnkit build: {'done' if rc == 0 else 'FAILED'} in {elapsed(start).strip()} (m:ss)", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
