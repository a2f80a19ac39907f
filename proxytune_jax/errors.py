"""Errors a user can cause and fix. The message always names the fix."""
from __future__ import annotations

import errno


class UserError(ValueError):
    """A wrong path, mismatched tokenizers, bad hyperparameters, ... (the CLI prints it without a traceback)."""


_OS_FIXES = {
    errno.ENOSPC: "no space left on the device{where}; free some space or write to another folder",
    errno.EDQUOT: "disk quota exceeded{where}; free some space or write to another folder",
    errno.EROFS: "read-only file system{where}; write to a folder on a writable disk",
    errno.EACCES: "permission denied{where}; write to a folder you may write to, or fix its permissions",
    errno.EPERM: "operation not permitted{where}; write to a folder you may write to, or fix its permissions",
    errno.ENOENT: "no such file or folder{where}; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder{where}; check the path",
    errno.EISDIR: "is a folder, not a file{where}; give a file path",
    errno.EMFILE: "too many open files{where}; raise the limit (ulimit -n)",
}


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error a user can fix (a full disk, an unwritable folder, a wrong path):
    what happened, where, and what to do. Files the library writes whole are written atomically, so the old
    file (if any) is still intact when this is shown."""
    name = err.filename if err.filename is not None else None
    where = f" ({name})" if name else ""
    fix = _OS_FIXES.get(err.errno)
    if fix is None:
        return f"{err.strerror or type(err).__name__}{where}; check the path and the disk"
    return fix.format(where=where)
