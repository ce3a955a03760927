"""Which files jpatch may replace or delete, and how processes share a folder.

jpatch replaces only what it wrote itself:

* an output folder carries a marker file (`MARKER`, JSON: kind, jpatch version, the
  files written). A folder may be written when it is new, empty, or (with
  `overwrite`) a jpatch output of the same kind holding only the files it lists;
  never the working directory, a folder containing it, or an input of the command.
* temporary files and folders are named `.NAME.tmp-HOST-PID-TICKS-RANDOM` (`tmp_name`):
  one whose process is gone (same host, pid not running or reused) is stale and
  removed by the next run into the same place (`remove_stale`); another host's or
  a live process's are left alone.
* a lock file (`Lock`) holds its owner (host, pid, start time); creating it is
  atomic (O_EXCL), and a lock whose owner is dead is taken over.
"""

import contextlib
import datetime
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

MARKER = ".jpatch-output.json"
OVERWRITE_HINT = "pass overwrite=True"  # the command line says "pass --overwrite" (jpatch.face.cli.cli_message)
_TMP_KINDS = ("tmp", "old")
UNREADABLE_LOCK_AGE = 60.0  # seconds after which a lock file that holds no owner counts as stale


# --- processes ----------------------------------------------------------------------------


def _ticks(pid):
    """The process's start time in clock ticks since boot (Linux), or None: tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner():
    """This process: {"host", "pid", "ticks", "start"} (start: wall-clock ISO time, for people)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "ticks": _ticks(os.getpid()),
            "start": _START}


_START = datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def is_alive(who):
    """True / False for a process of this host; None (unknown) for another host's."""
    if who.get("host") != socket.gethostname():
        return None
    pid = who.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    ticks = _ticks(pid)
    return who.get("ticks") is None or ticks is None or ticks == who["ticks"]


# --- temporaries ---------------------------------------------------------------------------


def tmp_name(name, kind="tmp"):
    """A hidden temporary name beside `name` that says which process made it."""
    me = owner()
    return f".{name}.{kind}-{me['host']}-{me['pid']}-{me['ticks']}-{uuid.uuid4().hex[:8]}"


def _tmp_owner(path, name):
    """(kind, owner) encoded in a `tmp_name`, or None when `path` is not one of ours."""
    for kind in _TMP_KINDS:
        prefix = f".{name}.{kind}-"
        if path.name.startswith(prefix):
            parts = path.name[len(prefix):].rsplit("-", 3)
            if len(parts) == 4 and parts[1].isdigit():
                ticks = int(parts[2]) if parts[2].isdigit() else None
                return kind, {"host": parts[0], "pid": int(parts[1]), "ticks": ticks}
    return None


def remove_stale(folder, name):
    """Remove the temporaries beside `folder/name` left by dead processes of this host; returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        found = _tmp_owner(path, name)
        if found is None or is_alive(found[1]) is not False:
            continue
        if found[0] == "old" and not (folder / name).exists():
            continue  # killed between moving the old folder aside and renaming the new one in: the only copy
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# --- output folders ------------------------------------------------------------------------


def read_marker(folder):
    """The folder's marker dict, or None when it has none (or an unreadable one)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def write_marker(folder, kind, files=None):
    """Mark `folder` as a jpatch `kind` output; `files`: the relative paths written (default: all now there)."""
    from jpatch.version import __version__

    folder = Path(folder)
    if files is None:
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    text = json.dumps({"kind": kind, "jpatch_version": __version__, "files": files}, indent=1) + "\n"
    (folder / MARKER).write_text(text)


def _listing(names, k=5):
    return ", ".join(sorted(names)[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def check_output(out_dir, kind, overwrite=False, *, inputs=()):
    """Raise unless `out_dir` may be written as a jpatch `kind` output; returns it as a Path.

    Allowed: a new folder, an empty one, or with `overwrite` a folder marked as a jpatch
    `kind` output that holds no file beyond those its marker lists. Refused always: the
    working directory or a folder containing it, a file, and `inputs` (paths the command
    reads, e.g. a conversion's source) or a folder containing one of them.
    """
    out_dir = Path(out_dir).expanduser()
    where = out_dir.resolve()
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise FileExistsError(f"refusing to write into {out_dir}: it is the working directory or contains it; "
                              "name a new folder")
    for source in inputs:
        source = Path(source).expanduser().resolve()
        if where == source or where in source.parents:
            raise FileExistsError(f"refusing to write into {out_dir}: it is or contains the input {source}")
    if not out_dir.exists() and not out_dir.is_symlink():
        return out_dir
    if out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} is a symbolic link; name the folder itself")
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return out_dir
    marker = read_marker(out_dir)
    if marker is None:
        names = [p.name for p in out_dir.iterdir()]
        raise FileExistsError(f"{out_dir} holds files jpatch did not write ({_listing(names)}); jpatch replaces "
                              "only its own output folders: choose a new or empty folder")
    if marker["kind"] != kind:
        raise FileExistsError(f"{out_dir} holds a jpatch {marker['kind']} output, not a {kind} output; "
                              "choose another folder")
    listed = set(marker.get("files") or ())
    extra = [str(p.relative_to(out_dir)) for p in out_dir.rglob("*")
             if p.name != MARKER and not p.is_dir() and str(p.relative_to(out_dir)) not in listed]
    if extra:
        raise FileExistsError(f"{out_dir} holds files jpatch did not write there ({_listing(extra)}); "
                              "move them away or choose another folder")
    if not overwrite:
        raise FileExistsError(f"{out_dir} holds a previous jpatch {kind} output; {OVERWRITE_HINT} to replace it")
    return out_dir


# --- lock files ----------------------------------------------------------------------------


class Lock:
    """An exclusive lock file holding its owner; `acquire()` -> True when this process holds it.

    A lock of a dead process on this host is taken over; another host's lock is never
    (its owner cannot be checked): `holder` says whose it is.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.held = False
        self.holder = None

    def _create(self):
        text = json.dumps(owner()).encode()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self):
        try:
            who = json.loads(self.path.read_text())
            return who if isinstance(who, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or garbage: treat as held by an unknown process

    def acquire(self):
        if self._create():
            self.held = True
            return True
        who = self._read()
        if who is None:  # released meanwhile
            return self.acquire()
        self.holder = who
        if not who:  # unreadable: being written now, or its writer died mid-write long ago
            try:
                if time.time() - self.path.stat().st_mtime < UNREADABLE_LOCK_AGE:
                    return False
            except FileNotFoundError:
                return self.acquire()
        elif is_alive(who) is not False:
            return False
        # Dead owner: move its lock aside atomically (one process wins the rename) and check
        # that what moved is still that stale lock before creating ours.
        aside = self.path.with_name(tmp_name(self.path.name, "old"))
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self.acquire()
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved != who:  # another process took it over first: give its lock back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        self.held = self._create()
        return self.held

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def describe(self):
        who = self.holder or {}
        return f"host {who.get('host')}, pid {who.get('pid')}, since {who.get('start')}"
