"""One run per output folder: a lock file in the folder that names its holder and shows it is alive.

`<output>/_caption-batch.lock` is JSON: host, pid, start time, a random token and the last heartbeat.

- Local disk: the file is created with `os.open(O_CREAT | O_EXCL)`, so two runs can never both create it.
  The holder's heartbeat thread touches its mtime every `stale_after / 5` seconds. A lock is stale when its
  holder is on this host and its pid is not running (a killed run), or when its heartbeat (the newer of the
  recorded time and the mtime) is older than `stale_after` (a dead run on another host sharing the folder).
  A stale lock is taken over under a second O_EXCL guard file (`<lock>.takeover`), so two runs that find the
  same stale lock cannot both delete it and then each take the other's fresh one.
- Object stores and other fsspec outputs: best effort. The lock object is created with fsspec's exclusive
  mode ("xb", which some stores implement with a conditional put) or, where that is not supported, by
  "write if absent" followed by reading it back; the holder rewrites the object with a new `heartbeat`
  time, and it is stale after `stale_after` seconds without one (hosts' clocks must roughly agree). Two runs
  starting within the same instant on a store without conditional writes can still both proceed.

The holder releases the lock on normal exit and on exceptions (context manager), and only if it is still
its own (the token matches). A holder whose lock was taken from it (its heartbeat stopped for
`stale_after`, e.g. a suspended process) sees that at its next heartbeat: `check()` then raises `LockLost`,
so it stops writing instead of racing the new holder.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from fsspec.implementations.local import LocalFileSystem

from af3dist.captioning.shards import output_fs

log = logging.getLogger(__name__)

LOCK_FILE = "_caption-batch.lock"
STALE_SECONDS = 300.0
_GUARD_STALE_SECONDS = 60.0  # a takeover guard lives for milliseconds; older means its taker died mid-way


class OutputLocked(RuntimeError):
    """Another live run holds the output folder's lock."""


class LockLost(RuntimeError):
    """This run's lock was taken over by another run (its heartbeat had stopped for too long)."""


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (f"host {self.host}, pid {self.pid}, started {_iso(self.started)}, "
                f"last heartbeat {now - self.heartbeat:.0f} s ago")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """The lock of one output folder (local path or fsspec URL); use as `with OutputLock(out) as lock:`."""

    def __init__(self, output: str, *, stale_after: float = STALE_SECONDS, heartbeat_every: float | None = None):
        self.output = output
        self.fs, root = output_fs(output)
        self.path = f"{root}/{LOCK_FILE}"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every if heartbeat_every is not None else stale_after / 5
        self.info: LockInfo | None = None  # ours, while held
        self.taken_over: str | None = None  # the stale holder and why it was stale, when we took over
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------------------
    # public API

    @property
    def held(self) -> bool:
        return self.info is not None and not self._lost

    def acquire(self) -> "OutputLock":
        """Take the lock, taking over a stale one; OutputLocked (naming the file and holder) when it is held."""
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        now = time.time()
        mine = LockInfo(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
        for _ in range(5):  # a lock that vanishes or is taken over under our feet: look again
            if self._create(mine):
                self.info = mine
                self._start_heartbeat()
                return self
            holder = self.read()
            if holder is None:
                continue
            why = self.stale_reason(holder)
            if why is None:
                raise OutputLocked(f"output {self.output} is in use by another caption-batch run "
                                   f"({holder.describe()}); lock file {self.path}. Wait for it to finish, or stop "
                                   f"it; a dead run's lock is taken over once its pid is gone (same host) or after "
                                   f"{self.stale_after:g} s without a heartbeat")
            self._remove_stale(holder, why)
        raise OutputLocked(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.info is not None and not self._lost:
            current = self.read()
            if current is not None and current.token == self.info.token:
                self._delete()
        self.info = None

    def check(self) -> None:
        """Raise LockLost when another run took the lock over from this one."""
        if self._lost:
            raise LockLost(f"the lock {self.path} was taken over by another run ({self._describe_current()}); "
                           f"this run stops writing to {self.output}")

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def read(self) -> LockInfo | None:
        """The lock file's holder, or None when there is no lock file. A file that cannot be parsed (a run
        killed between creating and filling it) reads as a holder with no pid whose heartbeat is its mtime."""
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        mtime = self._mtime()
        try:
            info = LockInfo(**json.loads(data))
        except (ValueError, TypeError):
            return LockInfo("?", -1, mtime or 0.0, mtime or 0.0, "")
        return LockInfo(info.host, info.pid, info.started, max(info.heartbeat, mtime or 0.0), info.token)

    def stale_reason(self, holder: LockInfo, now: float | None = None) -> str | None:
        """Why `holder`'s lock may be taken over, or None while it looks alive."""
        now = time.time() if now is None else now
        if holder.host == socket.gethostname() and holder.pid > 0 and not pid_alive(holder.pid):
            return f"pid {holder.pid} is not running on this host"
        if now - holder.heartbeat > self.stale_after:
            return f"no heartbeat for {now - holder.heartbeat:.0f} s (over {self.stale_after:g} s)"
        return None

    # ---------------------------------------------------------------------------------------------------
    # creating, refreshing and removing the file

    def _create(self, info: LockInfo) -> bool:
        """Create the lock file holding `info` unless it exists; True when this call created it."""
        data = json.dumps(asdict(info)).encode()
        if self.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # no exclusive mode here: write if absent, then read back
            if self.fs.exists(self.path):
                return False
            self.fs.pipe_file(self.path, data)
            current = self.read()
            return current is not None and current.token == info.token
        return True

    def _delete(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def _mtime(self) -> float | None:
        if not self.local:
            return None
        try:
            return os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None

    def _remove_stale(self, holder: LockInfo, why: str) -> None:
        """Delete `holder`'s stale lock, if it is still the lock file, under the takeover guard (local)."""
        if not self.local:
            current = self.read()
            if current is not None and current.token == holder.token:
                self._delete()
                self.taken_over = f"{holder.describe()}: {why}"
            return
        guard = f"{self.path}.takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.stat(guard).st_mtime > _GUARD_STALE_SECONDS:
                    os.unlink(guard)  # its taker died between creating and removing it
                    return
            except FileNotFoundError:
                return
            time.sleep(0.2)  # another run is taking over right now: see what it leaves
            return
        try:
            current = self.read()
            if current is not None and current.token == holder.token:
                os.unlink(self.path)
                self.taken_over = f"{holder.describe()}: {why}"
                log.warning("took over the stale lock %s (%s)", self.path, self.taken_over)
        finally:
            os.close(fd)
            os.unlink(guard)

    # ---------------------------------------------------------------------------------------------------
    # the heartbeat

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="caption-batch-lock", daemon=True)
        self._thread.start()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            try:
                if not self._beat():
                    self._lost = True
                    log.error("lost the lock %s to another run", self.path)
                    return
            except Exception as e:  # a flaky store: try again at the next beat; staleness needs many misses
                log.warning("lock heartbeat on %s failed: %s", self.path, e)

    def _beat(self) -> bool:
        """Refresh the heartbeat; False when the lock file is no longer ours."""
        assert self.info is not None
        current = self.read()
        if current is None or current.token != self.info.token:
            return False
        if self.local:
            os.utime(self.path)  # the mtime is the heartbeat: no rewrite, so nothing to race
        else:
            beat = LockInfo(**{**asdict(self.info), "heartbeat": time.time()})
            self.fs.pipe_file(self.path, json.dumps(asdict(beat)).encode())
        return True

    def _describe_current(self) -> str:
        current = self.read()
        return current.describe() if current else "lock file gone"

