"""Files published from temporaries get the permissions the user's umask gives new files.

``tempfile.mkstemp`` creates files with mode 0600 and ``tempfile.mkdtemp`` folders with 0700, so
a file or folder written to a temporary and then renamed into place would stay private to its
owner, and a serving container that runs as another user could not read it. ``follow_umask``
gives it the mode ``open()`` or ``mkdir()`` would have (0666 or 0777 less the umask).

Example:
    >>> import os, stat, tempfile
    >>> fd, path = tempfile.mkstemp()
    >>> os.close(fd)
    >>> follow_umask(path)
    >>> stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask()
    True
"""

from __future__ import annotations

import os
import threading

__all__ = ["follow_umask", "umask"]

_lock = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (other threads may be
    creating files meanwhile), else by setting it back at once."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Sets ``path`` (a file or a folder, not followed if a link) to the umask's default mode."""
    if os.path.islink(path):
        return
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~umask())
