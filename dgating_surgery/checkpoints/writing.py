"""Writing a file safely: checkpoints and exports alike. A unique temporary file in the destination
folder, never reached through a symbolic link, fsynced and renamed; an existing file's permissions
kept; an exclusive create when the caller must not replace anything (two commands writing one new
output: only the first succeeds). On failure nothing is left and the destination is untouched.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, DGatingError


def write_atomically(path, write: Callable[[str], None], replace: bool = True) -> Path:
    """Write ``path`` through ``write(temporary_path)``. The temporary file has a unique name in the
    destination folder (``mkstemp``: created exclusively, so no symbolic link someone planted can
    stand there), is reopened without following links, keeps the permissions of the file it
    replaces (a new one: those the umask allows), is fsynced and renamed over ``path`` (over a
    symbolic link itself, never its target).
    ``replace=False``: ``path`` must not exist and is created exclusively (a hard link), so that of
    two commands writing one new file only the first succeeds. On failure the temporary file is
    removed and ``path`` is untouched."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory '{parent}' does not exist (create it first)")
    if path.is_dir() and not path.is_symlink():
        raise CheckpointError(f"cannot write {path}: it is a folder; name the file to write")
    if not replace and os.path.lexists(path):
        raise CheckpointError(f"{path} exists: pass --force (replace=True) to replace it, or write to another file")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
        os.close(fd)  # the writers open the name themselves (safetensors writes a new file under it)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointError(f"cannot write {path}: its temporary file {tmp} is not a regular file")
            os.fchmod(fd, _mode_for(path))
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            _create_exclusively(tmp, path)
        _fsync_folder(parent)
    except BaseException as exc:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, DGatingError):
            raise CheckpointError(f"cannot write {path}: {_write_failure(exc)}; nothing was written") from None
        raise  # ours, or Ctrl-C: the temporary file is gone, the target untouched
    return path


def _create_exclusively(tmp: str, path: Path) -> None:
    """Give the written ``tmp`` the name ``path`` only if nothing has it: a hard link fails when
    the name exists (a file system without hard links: an exclusive create, then the rename)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise CheckpointError(f"{path} exists (another command wrote it meanwhile): pass --force to replace it, or "
                              "write to another file") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
        except FileExistsError:
            raise CheckpointError(f"{path} exists (another command wrote it meanwhile): pass --force to replace it, "
                                  "or write to another file") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _mode_for(path: Path) -> int:
    """The permissions the written file gets: those of the regular file it replaces, else the
    ordinary ones the umask allows (``--force`` never widens a private file)."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except FileNotFoundError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX: the folder's entry); a file system that cannot is left as it is."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_failure(exc: Exception) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    code = exc.errno if isinstance(exc, OSError) else None
    found = re.search(r"os error (\d+)", text)
    code = code or (int(found.group(1)) if found else None)
    if code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"{os.strerror(code)} (is the disk full?)"
    return text
