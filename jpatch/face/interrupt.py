"""Ctrl-C in the `jpatch` command: one line and exit status 130, never a crash."""

import contextlib
import os
import signal
import sys
import threading


class CtrlC:
    """The SIGINT handler while a command runs (in the main thread).

    A Ctrl-C raises KeyboardInterrupt where the program is, so context managers still remove
    their temporary files and release their locks on the way out; `main` then reports it and
    leaves with `os._exit(130)`, skipping interpreter finalization, which ran while XLA's
    compile and runtime threads were still working and crashed (exit 139) in 6 of 20 Ctrl-Cs
    sent to `jpatch demo` while it compiled. Where the raise would be swallowed (Python prints
    "Exception ignored" for a garbage-collection callback or a `__del__` and carries on) the
    signal is sent again a moment later instead. A second Ctrl-C leaves at once."""

    SWALLOWED = ("__del__", "_xla_gc_callback")  # frames whose exceptions Python ignores

    def __init__(self, message, status):
        self.message, self.status = message, status  # the one line, and the exit status, of an interrupt
        self.signalled = False  # a Ctrl-C arrived
        self.resent = False  # the next SIGINT is our own re-sent one
        self.reported = False
        self.previous = None

    def install(self):
        if threading.current_thread() is threading.main_thread():  # else: Python's own handling
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def handle(self, signum, frame):
        resent, self.resent = self.resent, False
        if self.signalled and not resent:
            self.leave()
        self.signalled = True
        if frame is not None and frame.f_code.co_name in self.SWALLOWED:
            self.resent = True
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        raise KeyboardInterrupt

    def leave(self):
        """Report the interrupt (once), flush, and end the process without finalizing it."""
        if not self.reported:
            self.reported = True
            with contextlib.suppress(Exception):
                print(self.message, file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.status)
