"""dsvl2's per-user cache directory, and the checks that make what it holds trustworthy.

Where: ``$DSVL2_CACHE_DIR``, else ``$XDG_CACHE_HOME/dsvl2`` (an absolute XDG_CACHE_HOME,
as the XDG spec asks), else ``~/.cache/dsvl2``. It holds the native decode kernels
(``model/native``: ``native/bf16-<hash>.so``, code that is loaded into the process) and
the kernel choice of this machine (``model/native/policy.py``: ``kernels.json``, data).

Trust: a file there is used only if no one but us (and root) can have written it. Every
directory dsvl2 creates on the way (the cache root and the folders under it) is created
with mode 0700 and, where it exists already, must be a real directory (not a symlink),
owned by the effective user and not writable by group or others; so must the file
itself, which must be a regular file too. The checks are made on open file descriptors
(``O_NOFOLLOW``, ``fstat``), and the file is then read, or loaded, through that same
descriptor, so nothing can be swapped in between the check and the use. Directories
above the cache root (``~/.cache``, ``$XDG_CACHE_HOME``, the parent of
``$DSVL2_CACHE_DIR``) are the user's own choice: they are created if missing, not checked.

Not on POSIX systems (Windows): the paths are used as they are (no owner to compare;
per-user profile folders are private there).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

POSIX = os.name == "posix"
_DIR = getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | os.O_RDONLY
# O_NONBLOCK: a FIFO planted under the name must not hang the open (it is refused after)
_FILE = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0) | os.O_RDONLY


class Untrusted(Exception):
    """A cache directory or file that someone else could have written (the message says which and why)."""


def root() -> Path:
    """The cache root (see the module docstring); not created here."""
    base = os.environ.get("DSVL2_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = os.path.join(xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache"), "dsvl2")
    return Path(os.path.abspath(os.path.expanduser(base)))


def why_untrusted(st: os.stat_result, kind: str) -> str | None:
    """Why a directory (kind "dir") or file ("file") with this ``lstat`` / ``fstat`` is not
    ours alone, or None."""
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        return "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
    if POSIX and st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _makedirs(path: Path) -> None:
    """Create the missing directories of ``path`` (mode 0700); existing ones are left alone."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass


def open_dir(*sub: str) -> tuple[int, Path]:
    """(an open descriptor, the path) of the cache root's folder ``sub`` (the root itself
    without), every component from the root down created (0700) or checked. The caller
    closes the descriptor. Raises ``Untrusted``, or ``OSError`` where it cannot be created."""
    base = root()
    path = base.joinpath(*sub)
    if not POSIX:
        path.mkdir(parents=True, exist_ok=True)
        return -1, path
    if not base.name:
        raise Untrusted(f"the cache directory cannot be {base}")
    _makedirs(base.parent)
    fd = os.open(base.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)  # the user's own
    here = base.parent
    try:
        for name in (base.name, *sub):
            here = here / name
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            except OSError as e:  # read-only, no permission: fine if it exists
                if not os.path.lexists(here):
                    raise OSError(e.errno, f"cannot create {here}: {e.strerror}") from None
            try:
                nfd = os.open(name, _DIR, dir_fd=fd)
            except OSError as e:  # ELOOP / ENOTDIR: a symlink or a file; EACCES: another user's
                kind = ("a symlink" if os.path.islink(here) else "not accessible" if os.path.isdir(here)
                        else "not a directory")
                raise Untrusted(f"{here} is {kind} ({e.strerror})") from None
            os.close(fd)
            fd = nfd
            why = why_untrusted(os.fstat(fd), "dir")
            if why:
                raise Untrusted(f"{here} is {why}")
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def open_file(dir_fd: int, dir_path: Path, name: str) -> int:
    """An open read-only descriptor of the file ``name`` in an ``open_dir`` directory,
    checked (a regular file, not a symlink, ours, not writable by group / others).
    Raises ``FileNotFoundError`` where there is none, ``Untrusted`` where it is not ours alone."""
    if not POSIX:
        return os.open(dir_path / name, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: a symlink
        try:
            why = why_untrusted(os.lstat(name, dir_fd=dir_fd), "file") or "unreadable"
        except OSError:
            why = "unreadable"
        raise Untrusted(f"{dir_path / name} is {why} ({e.strerror})") from None
    why = why_untrusted(os.fstat(fd), "file")
    if why:
        os.close(fd)
        raise Untrusted(f"{dir_path / name} is {why}")
    return fd


def read_file(name: str, *sub: str) -> bytes | None:
    """The contents of the cache's ``sub/name`` if it exists and is ours alone, else None
    (missing, unreadable or untrusted: the caller computes it again)."""
    try:
        dfd, path = open_dir(*sub)
    except (OSError, Untrusted):
        return None
    try:
        fd = open_file(dfd, path, name)
    except (OSError, Untrusted):
        return None
    finally:
        if dfd >= 0:
            os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def write_file(name: str, data: bytes, *sub: str) -> bool:
    """Write the cache's ``sub/name`` atomically (a private temporary file renamed over it),
    in a checked directory. False where that cannot be done (read-only, untrusted)."""
    try:
        dfd, path = open_dir(*sub)
    except (OSError, Untrusted):
        return False
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path)  # mode 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if POSIX:
            os.replace(tmp, name, dst_dir_fd=dfd)
        else:
            os.replace(tmp, path / name)
        tmp = None
        return True
    except OSError:
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if dfd >= 0:
            os.close(dfd)
