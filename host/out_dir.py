"""The host's output folder (``--out``), written without ever following a symlink inside it.

``--out`` itself may be a symlink the operator made: it is resolved once, when the host starts. Everything below it
is created and opened relative to that folder's file descriptor with ``O_NOFOLLOW``, so a symlink planted inside it
(a stream folder, a PNG, the journal folder or a journal file; by anyone who can write to the folder: another local
user, a container sharing the volume) is refused, never followed, and nothing is ever written outside ``--out``.
Files appear whole: written under a new temporary name (``O_CREAT | O_EXCL``), then renamed over the final name
(a rename replaces a name, it never follows it). Every refusal is an ``OSError`` whose message names the path.

Needs ``openat``-style calls (``os.open`` with ``dir_fd``) and ``O_NOFOLLOW``: Linux and macOS have them.
"""

import errno
import io
import os
import stat

from latentlink.edge.errors import ConfigError

_FOLDER = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
SUPPORTED = hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY") and {os.open, os.mkdir, os.stat, os.rename,
                                                                           os.unlink} <= os.supports_dir_fd


class OutDir(object):
    """The folder ``path`` (created if missing, resolved once); files are ``<folder>/<name>`` directly below it,
    where ``folder`` and ``name`` are single path components (stream names are, see ``edge.protocol``)."""

    def __init__(self, path):
        if not SUPPORTED:
            raise ConfigError("--out needs a system that can open files without following symlinks (os.open with "
                              "dir_fd and O_NOFOLLOW: Linux or macOS); this one cannot, so run the host without --out")
        self.path = os.path.realpath(path)  # the operator's own symlink is followed here, once
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise ConfigError("cannot create the --out folder {} ({}): pick a folder this user can write".format(
                path, exc))

    def where(self, folder, name=None):
        """The path of ``folder`` (or of ``name`` in it), for messages."""
        return os.path.join(self.path, folder) if name is None else os.path.join(self.path, folder, name)

    def write(self, folder, name, data):
        """Write ``data`` (bytes) as ``folder/name``, replacing a regular file of that name."""
        with _Folder(self, folder) as fd:
            _refuse_non_file(fd, self.where(folder, name), name)
            tmp = ".{}.{}.tmp".format(name, os.urandom(4).hex())  # dot first: never taken for a frame
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
            try:
                with io.open(out, "wb") as f:
                    f.write(data)
                os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=fd)
                except OSError:
                    pass
                raise

    def append(self, folder, name, text):
        """Append ``text`` (str, UTF-8) to the regular file ``folder/name``, created if missing."""
        with _Folder(self, folder) as fd:
            # O_NONBLOCK: a FIFO planted under the name must not block the open; it is refused below.
            out = _open_file(fd, self.where(folder, name), name,
                             os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK)
            with io.open(out, "ab") as f:
                f.write(text.encode("utf-8"))

    def open_text(self, folder, name):
        """The regular file ``folder/name`` opened for reading (text, UTF-8, bad bytes replaced); None if it does
        not exist."""
        try:
            with _Folder(self, folder, create=False) as fd:
                f = _open_file(fd, self.where(folder, name), name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        return io.open(f, encoding="utf-8", errors="replace")


class _Folder(object):
    """``with _Folder(out, name) as fd``: the folder directly below ``out``, created if missing (unless ``create``
    is False), opened without following a symlink."""

    def __init__(self, out, name, create=True):
        self.out, self.name, self.create = out, name, create
        self.fd = None

    def __enter__(self):
        root = os.open(self.out.path, _FOLDER)
        try:
            if self.create:
                try:
                    os.mkdir(self.name, 0o755, dir_fd=root)
                except FileExistsError:
                    pass
            try:
                self.fd = os.open(self.name, _FOLDER | os.O_NOFOLLOW, dir_fd=root)
            except OSError as exc:
                _explain(exc, root, self.out.where(self.name), self.name, "folder")
        finally:
            os.close(root)
        return self.fd

    def __exit__(self, *exc_info):
        os.close(self.fd)
        return False


def _open_file(folder_fd, path, name, flags):
    """os.open of ``name`` in ``folder_fd`` with ``flags``; the result must be a regular file (else OSError)."""
    try:
        fd = os.open(name, flags, 0o644, dir_fd=folder_fd)
    except OSError as exc:
        _explain(exc, folder_fd, path, name, "file")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "{} is not a regular file; refusing to use it (planted in --out?)".format(path))
    os.set_blocking(fd, True)
    return fd


def _refuse_non_file(folder_fd, path, name):
    """OSError unless ``name`` in ``folder_fd`` is missing or a regular file (a symlink is refused, not followed)."""
    try:
        mode = os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise OSError(errno.ELOOP, "{} is a symlink; refusing to follow it (planted in --out?)".format(path))
    if not stat.S_ISREG(mode):
        raise OSError(errno.EEXIST, "{} exists and is not a regular file; refusing to replace it".format(path))


def _explain(exc, parent_fd, path, name, what):
    """Re-raise ``exc`` (from an O_NOFOLLOW open) saying plainly when ``name`` was a symlink."""
    try:
        mode = os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode
    except OSError:
        raise exc  # it does not exist (or cannot be seen): the error as it was
    if stat.S_ISLNK(mode):
        raise OSError(errno.ELOOP, "{} is a symlink; refusing to follow it (planted in --out?)".format(path))
    if (what == "folder" and not stat.S_ISDIR(mode)) or (what == "file" and not stat.S_ISREG(mode)):
        raise OSError(exc.errno, "{} is not a {}; refusing to use it (planted in --out?)".format(
            path, "regular file" if what == "file" else what))
    raise exc
