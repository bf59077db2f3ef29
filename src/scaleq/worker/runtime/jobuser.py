"""Who a process job runs as: on a root worker, an unprivileged user (``nobody`` unless told otherwise).

A process job is a plain subprocess of its worker. Run as the worker's user, it could read whatever the worker
reads — on the embedded default (``scaleq up`` as root) the data dir with ``admin.token`` and ``scaleq.db``, so a
submit token would become admin. So a worker running as root runs its process jobs as another user:

- **Resolving** (:func:`resolve`): ``scaleq worker --job-user NAME`` / ``SCALEQ_JOB_USER``, ``nobody`` by default on
  a root worker. Naming the worker's own user (``root``) keeps jobs as the worker's user, on purpose. A worker that
  is not root cannot switch users: asking it to is an error, and its jobs run as itself (the docs say what holds).
- **Dropping privileges** happens in the child between ``fork`` and ``exec`` (:meth:`JobUser.become`, a
  ``preexec_fn``: uvloop, the worker's event loop, refuses ``subprocess``'s ``user=``/``group=``): no supplementary
  groups, the job user's group, then its uid, for good; then the ``chdir`` into the job's working directory, as the
  job user, so a path that changed after it was checked still leads nowhere the job user could not go. The job's
  own environment (``PATH``, ``LD_PRELOAD``, …) only takes effect at the ``exec`` that follows, as the job user,
  never in the worker or its helpers.
- **The attempt dir** (inputs, outputs, the job's working directory) is handed to the job user for the run
  (:func:`give`) and taken back before anything in it is read as root (:func:`take_back`): every directory is made
  the worker's and ``0700`` top-down, parents before children, so no process of the job user can swap a path for a
  symlink behind the walk; symlinks are re-owned, never followed; and whatever in the tree the job user does not own
  (a hard link to someone else's file) is removed rather than collected, so outputs cannot make the root worker read
  what the job could not.
- **A working directory** the job names (``workdir``) must be enterable by the job user (:func:`can_enter`, read
  from permission bits along the resolved path), or the job fails with an error saying so.

Jobs of the same job user are not isolated from each other (they can signal and read each other's processes):
per-job isolation is what container jobs are for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_JOB_USER = "nobody"


class JobUserError(ValueError):
    """The job user asked for cannot be used here; the message says why."""


@dataclass(frozen=True)
class JobUser:
    name: str
    uid: int
    gid: int

    def become(self, cwd: str) -> Callable[[], None]:
        """A ``preexec_fn`` that turns the forked child into this user, in ``cwd``. System calls only: it runs
        between ``fork`` and ``exec`` of a process with threads."""
        uid, gid = self.uid, self.gid

        def child() -> None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)  # as root this sets the real, effective and saved uid: no way back
            os.chdir(cwd)

        return child


def lookup(name: str) -> JobUser:
    """The user ``name`` (or a numeric uid) on this host."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise JobUserError(f"no user {name!r} on this host") from None
    return JobUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def resolve(asked: str | None, *, euid: int | None = None) -> JobUser | None:
    """The user process jobs run as, or None for the worker's own user.

    A root worker uses ``asked`` or ``nobody``; a worker that is not root can only be asked for its own user.
    """
    euid = os.geteuid() if euid is None else euid
    if asked is not None and not asked.strip():
        raise JobUserError("empty user name")
    if euid != 0:
        if asked is not None and lookup(asked).uid != euid:
            raise JobUserError(f"only a worker running as root can run jobs as another user ({asked!r})")
        return None
    user = lookup(asked or DEFAULT_JOB_USER)
    if user.uid == 0:
        log.warning("process jobs run as root (--job-user %s): they can read this host's secrets", user.name)
        return None
    return user


def give(tree: Path, user: JobUser) -> None:
    """Hand ``tree`` (written by the worker alone so far) to ``user`` for the run; its top stays ``0700``."""
    os.chown(tree, user.uid, user.gid, follow_symlinks=False)
    os.chmod(tree, 0o700)
    for path, _ in _walk(tree):
        os.chown(path, user.uid, user.gid, follow_symlinks=False)


def take_back(tree: Path, user: JobUser) -> int:
    """Make ``tree`` the worker's again, safe to read as root; the number of foreign entries removed.

    Each directory is re-owned and made ``0700`` before it is listed, so by the time a path is used every directory
    above it is out of the job user's reach; nothing is followed through a symlink.
    """
    uid, gid = os.geteuid(), os.getegid()
    os.chown(tree, uid, gid, follow_symlinks=False)
    os.chmod(tree, 0o700)
    removed = 0
    for path, st in _walk(tree):
        if st.st_uid != user.uid:
            if not stat.S_ISDIR(st.st_mode):  # a hard link to a file that is not the job's
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed += 1
                    log.warning("removed %s from a job's files: owned by uid %d, not the job's", path, st.st_uid)
            continue
        os.chown(path, uid, gid, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(path, 0o700)  # a real directory (lstat), in a parent the job user can no longer change
        elif stat.S_ISREG(st.st_mode) and st.st_mode & 0o022:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022)
    return removed


def _walk(top: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below ``top`` with its ``lstat``, parents before children; with a stack (trees may be deep),
    descending only into real directories, each listed only after the caller has handled its entry."""
    stack = [str(top)]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                names = [e.name for e in it]
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)


def can_enter(path: str, user: JobUser) -> bool:
    """Whether ``user`` may use ``path`` as its working directory: search permission on every directory of its
    resolved path, read on the last one (from mode bits: the job user has no supplementary groups)."""
    real = os.path.realpath(path)
    parts = Path(real).parts
    try:
        for i in range(1, len(parts) + 1):
            st = os.stat(os.path.join(*parts[:i]))
            need = stat.S_IXUSR | (stat.S_IRUSR if i == len(parts) else 0)
            if not _allowed(st, user, need):
                return False
    except OSError:
        return False
    return stat.S_ISDIR(os.stat(real).st_mode)


def _allowed(st: os.stat_result, user: JobUser, need: int) -> bool:
    """``need`` given as owner bits (``S_IXUSR``, ``S_IRUSR``), checked against the class of ``user``."""
    if st.st_uid == user.uid:
        shift = 0
    elif st.st_gid == user.gid:
        shift = 3
    else:
        shift = 6
    return (st.st_mode << shift) & need == need
