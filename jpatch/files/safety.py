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
* a lock file (`Lock`) holds its owner (host, pid, start time) and its lease; creating it is
  atomic (O_EXCL), its holder refreshes its modification time while it runs, and a lock whose
  owner is dead (same host) or whose lease ran out unrefreshed (any host: a pre-empted pod comes
  back under a new hostname) is taken over. `break_locks` removes a folder's locks by hand.
"""

import contextlib
import datetime
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

MARKER = ".jpatch-output.json"
OVERWRITE_HINT = "pass overwrite=True"  # the command line says "pass --overwrite" (jpatch.face.cli.cli_message)
_TMP_KINDS = ("tmp", "old")
UNREADABLE_LOCK_AGE = 60.0  # seconds after which a lock file that holds no owner counts as stale
LOCK_LEASE = 300.0  # seconds a lock stays valid unrefreshed; its holder refreshes it every LOCK_LEASE / 10


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


def check_placement(out_dir, *, inputs=()):
    """Refuse, for any output (a replaced folder or a shared bulk folder): the working directory or a
    folder containing it, `inputs` (paths the command reads) or a folder containing one, and a
    symbolic link (jpatch writes to the folder itself, never through a link)."""
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
    if out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} is a symbolic link; name the folder itself")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    return out_dir


def check_writable(folder, what="the output folder"):
    """Raise PermissionError unless files can be created in `folder`, or (when it does not exist yet)
    in its nearest existing parent, which must then be a folder."""
    shown = Path(folder).expanduser()
    folder = shown.absolute()
    there = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if there is None:
        return
    if not there.is_dir():
        raise PermissionError(f"cannot create {what} {shown}: {there} is not a directory")
    if not os.access(there, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {what} {shown}: {there} is not writable")


def _created_folders(files):
    """The folders (relative paths) that hold the listed files."""
    return {str(parent) for f in files for parent in Path(f).parents if str(parent) != "."}


def check_output(out_dir, kind, overwrite=False, *, inputs=()):
    """Raise unless `out_dir` may be written as a jpatch `kind` output; returns it as a Path.

    Allowed: a new folder, an empty one, or with `overwrite` a folder marked as a jpatch
    `kind` output that holds nothing beyond the files its marker lists (and their folders): no
    other file, folder or link. Refused always: the working directory or a folder containing
    it, a symbolic link, a file, `inputs` (paths the command reads, e.g. a conversion's source)
    or a folder containing one of them, and a place jpatch cannot write.
    """
    out_dir = check_placement(out_dir, inputs=inputs)
    check_writable(out_dir.parent)  # the new folder is built beside its target and renamed
    if not out_dir.exists():
        return out_dir
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
    folders = _created_folders(listed)
    extra = []
    for p in out_dir.rglob("*"):  # does not descend into linked folders
        rel = str(p.relative_to(out_dir))
        if p.name == MARKER and p.is_file() and not p.is_symlink():  # this output's and its parts' markers
            continue
        ours = rel in folders if p.is_dir() and not p.is_symlink() else rel in listed and not p.is_symlink()
        if not ours:
            extra.append(rel)
    if extra:
        raise FileExistsError(f"{out_dir} holds files jpatch did not write there ({_listing(extra)}); "
                              "move them away or choose another folder")
    if not overwrite:
        raise FileExistsError(f"{out_dir} holds a previous jpatch {kind} output; {OVERWRITE_HINT} to replace it")
    check_writable(out_dir)  # its files are deleted once the new folder is in place
    return out_dir


# --- lock files ----------------------------------------------------------------------------


class Lock:
    """An exclusive lock file holding its owner and lease; `acquire()` -> True when this process holds it.

    While the lock is held a daemon thread refreshes the file's modification time every
    lease / 10 seconds. A lock is taken over when its owner is a dead process of this host, or
    when it went unrefreshed for longer than its lease, whatever its host (another host's owner
    cannot be checked, and a pre-empted pod comes back under a new hostname). A live owner on
    this host keeps its lock. `holder` says whose it is; `break_locks` removes locks by hand.
    """

    def __init__(self, path, lease=None):
        self.path = Path(path)
        self.lease = LOCK_LEASE if lease is None else float(lease)
        if not 0 < self.lease < float("inf"):
            raise ValueError(f"a lock's lease must be a finite number of seconds > 0, got {lease!r}")
        self.held = False
        self.holder = None
        self._stop = self._thread = None

    def _create(self):
        text = json.dumps({**owner(), "lease": self.lease}).encode()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self._hold()
        return True

    def _hold(self):
        """Mark the lock held and refresh its modification time until `release`."""
        self.held = True
        stop, path, interval = threading.Event(), self.path, self.lease / 10

        def refresh():
            while not stop.wait(interval):
                with contextlib.suppress(OSError):
                    os.utime(path)

        self._stop, self._thread = stop, threading.Thread(target=refresh, daemon=True, name=f"jpatch {path.name}")
        self._thread.start()

    def _read(self):
        try:
            who = json.loads(self.path.read_text())
            return who if isinstance(who, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or garbage: treat as held by an unknown process

    def _age(self):
        """Seconds since the lock file was last refreshed (None: it is gone)."""
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def acquire(self):
        if self._create():
            return True
        who = self._read()
        if who is None:  # released meanwhile
            return self.acquire()
        self.holder = who
        age = self._age()
        if age is None:
            return self.acquire()
        if not who:  # unreadable: being written now, or its writer died mid-write long ago
            if age < UNREADABLE_LOCK_AGE:
                return False
        else:
            alive = is_alive(who)
            lease = who.get("lease")
            lease = lease if isinstance(lease, (int, float)) and 0 < lease < float("inf") else LOCK_LEASE
            if alive or (alive is None and age <= lease):
                return False
        # Dead or expired owner: move its lock aside atomically (one process wins the rename) and
        # check that what moved is still that stale lock before creating ours.
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
        return self._create()

    def release(self):
        if self.held:
            self._stop.set()
            self._thread.join()
            self.path.unlink(missing_ok=True)
            self.held = False

    def describe(self):
        who = self.holder or {}
        lease = who.get("lease", LOCK_LEASE)
        return (f"host {who.get('host')}, pid {who.get('pid')}, since {who.get('start')}; taken over once "
                f"unrefreshed for {lease:g} s")


def is_lock_file(path):
    """Whether `path` is a lock file jpatch wrote (`.NAME.lock` holding a `Lock` owner), not a link."""
    path = Path(path)
    if path.is_symlink() or not path.is_file() or not (path.name.startswith(".") and path.name.endswith(".lock")):
        return False
    try:
        who = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(who, dict) and {"host", "pid", "start"} <= set(who)


def break_locks(folder):
    """Remove the lock files jpatch wrote directly in `folder` (only when no run is writing into it:
    a live run's lock broken lets a second run compute the same shards); returns their paths."""
    removed = []
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink():
        for path in sorted(folder.iterdir()):
            if is_lock_file(path):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def is_own_file(path, names, kind):
    """Whether `path`, found in a shared output folder, is a file jpatch keeps there besides `names`
    (the files it writes): its `kind` marker, the lock or a temporary of one of `names`."""
    path = Path(path)
    if path.name == MARKER:
        return not path.is_symlink() and (read_marker(path.parent) or {}).get("kind") == kind
    lock = path.name.removeprefix(".").removesuffix(".lock")
    if path.name.endswith(".lock") and lock in names:
        try:  # a lock, or one being written this instant (created empty, then filled)
            return is_lock_file(path) or (path.is_file() and not path.is_symlink() and path.stat().st_size == 0)
        except OSError:
            return True  # released meanwhile
    return not path.is_symlink() and any(_tmp_owner(path, name) is not None for name in names)
