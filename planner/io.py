"""Files in and out: atomic writes of files and of whole folders, bounded reads, printable text.

Writing. An artifact is either complete on disk or absent (or the previous version), never
half-written:

* a file (:func:`write_atomic` and friends) is written to a temporary sibling
  ``.NAME.tmp-<host>-<pid>-<random>`` and renamed onto ``NAME`` (one ``rename``, atomic on POSIX);
* a folder (:func:`atomic_folder`) is written into a temporary sibling folder of the same pattern
  and swapped in as a whole. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``: at every
  instant ``NAME`` is the old folder or the new one, complete; the old one, now under the temporary
  name, is then removed. Where the file system cannot exchange, the swap is two renames
  (``NAME`` -> ``.NAME.old-<host>-<pid>-<random>``, temporary -> ``NAME``); a writer killed between
  them leaves ``NAME`` missing and the old folder under its ``.old-`` name, and the next reader
  (:func:`recover_folder`, which :func:`atomic_folder` and the artifact loaders call) renames it back.

Leftovers (a killed writer's temporary files and folders, and old folders it did not get to remove)
are removed by the next write of the same name: those of a process of this host that no longer
runs at once, those of other hosts (a shared file system) after a day.

OS errors while writing become one-line :class:`PlannerError` s naming the target path
(``cannot write plans/x.json: Permission denied``).

Reading. :func:`read_bytes_limited` reads a regular file of at most a given size (a device such as
``/dev/zero``, a FIFO or an oversized file is refused before anything big is allocated).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from planner.errors import PlannerError

# Plans, profile metadata, fronts, checkpoints: none comes near this; a bigger file is not ours.
MAX_ARTIFACT_BYTES = 64 * 2**20
# A leftover of another host's writer is removed once it is this old (its process cannot be asked).
FOREIGN_LEFTOVER_S = 24 * 3600
# Temporary files of earlier planner versions (``.NAME.XXXXXXXX.tmp``, no process id): removed after this.
LEGACY_LEFTOVER_S = 3600


# --------------------------------------------------------------------------- messages
def os_reason(exc: BaseException) -> str:
    """The reason of an OS error in words (``Permission denied``), without the paths."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def printable(text: Any, keep_newlines: bool = True) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\u202e``), so that a file name or
    a value from a file cannot drive the terminal; ``keep_newlines`` keeps line breaks and tabs."""
    text = str(text)
    if text.isprintable():
        return text
    keep = "\n\t" if keep_newlines else ""
    return "".join(ch if ch.isprintable() or ch in keep else ch.encode("unicode_escape").decode("ascii") for ch in text)


# --------------------------------------------------------------------------- reading
def read_bytes_limited(path: str | os.PathLike, what: str = "file", limit: int = MAX_ARTIFACT_BYTES) -> bytes:
    """The bytes of the regular file ``path``; PlannerError naming the path when it is missing, a folder,
    not a regular file, unreadable or larger than ``limit`` bytes (never more than ``limit + 1`` are read)."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise PlannerError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise PlannerError(f"cannot read {path}: {os_reason(exc)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise PlannerError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise PlannerError(f"{path}: not a regular file (a device or a pipe), not a {what}")
    if info.st_size > limit:
        raise PlannerError(f"{path}: {info.st_size} bytes, larger than any {what} ({_size(limit)} at most)")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise PlannerError(f"cannot read {path}: {os_reason(exc)}") from None
    if len(data) > limit:  # grew while we looked
        raise PlannerError(f"{path}: larger than any {what} ({_size(limit)} at most)")
    return data


def read_text_limited(path: str | os.PathLike, what: str = "file", limit: int = MAX_ARTIFACT_BYTES) -> str:
    """:func:`read_bytes_limited` decoded as UTF-8; PlannerError when it is not UTF-8 text."""
    data = read_bytes_limited(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlannerError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); not a {what}") from None


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n} bytes"


# --------------------------------------------------------------------------- names of temporary things
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _temp_name(name: str, kind: str) -> str:
    """``.NAME.KIND-<host>-<pid>-<random>``: whose it is, so that leftovers of dead writers can be told apart."""
    return f".{name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(3)}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text()
        return status.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _writer_gone(entry: Path, tag: str, now: float) -> bool:
    """Whether the writer that made ``entry`` (tag ``<host>-<pid>-<random>``) is gone for good."""
    parts = tag.split("-")
    if len(parts) == 3 and parts[0] == _HOST and parts[1].isdigit():
        pid = int(parts[1])
        return pid != os.getpid() and not process_alive(pid)
    try:
        age = now - entry.lstat().st_mtime
    except OSError:
        return False
    return age > FOREIGN_LEFTOVER_S


def _leftovers(path: Path, kinds: tuple[str, ...] = ("tmp", "old")) -> Iterator[tuple[Path, str, str]]:
    """``(entry, kind, tag)`` for every temporary sibling of ``path`` of the given kinds."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        kind, sep, tag = rest.partition("-")
        if sep and kind in kinds:
            yield path.parent / name, kind, tag
        elif "tmp" in kinds and rest.endswith(".tmp") and len(rest) == 12:  # mkstemp names of earlier versions
            yield path.parent / name, "legacy", ""


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed writers of ``path`` left beside it; returns them."""
    path, now, removed = Path(path), time.time(), []
    for entry, kind, tag in list(_leftovers(path)):
        if kind == "legacy":
            try:
                gone = now - entry.lstat().st_mtime > LEGACY_LEFTOVER_S
            except OSError:
                continue
        else:
            gone = _writer_gone(entry, tag, now)
        if gone:
            _remove(entry)
            removed.append(entry)
    return removed


def recover_folder(path: str | os.PathLike) -> bool:
    """Put back a folder that a writer killed in the middle of a two-rename swap left under its
    ``.NAME.old-*`` name (``NAME`` itself missing); returns whether it did."""
    path = Path(path)
    if os.path.lexists(path):
        return False
    now = time.time()
    olds = [(e, t) for e, k, t in _leftovers(path, ("old",)) if e.is_dir() and _writer_gone(e, t, now)]
    for entry, _ in sorted(olds, key=lambda et: et[0].stat().st_mtime, reverse=True):
        with contextlib.suppress(OSError):
            os.rename(entry, path)
            return True
    return False


def _remove(entry: Path) -> None:
    with contextlib.suppress(OSError):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink()


# --------------------------------------------------------------------------- writing files
def check_output_path(path: str | os.PathLike, what: str = "file") -> Path:
    """PlannerError unless ``path`` can be written as a ``what`` (``file``, ``folder``, or ``png``: a file
    named ``.png``, for the images the planner writes): checked before a command does its work, so that a
    bad ``--out`` fails in a second rather than after an hour."""
    path = Path(path)
    if what == "png":
        check_output_path(path, "file")
        if path.suffix.lower() != ".png":
            raise PlannerError(f"cannot write {path}: the image is a PNG, so its name must end in .png")
        return path
    if what == "file" and path.is_dir():
        raise PlannerError(f"cannot write {path}: it is a folder")
    if what == "folder" and path.exists() and not path.is_dir():
        raise PlannerError(f"cannot write {path}: it is a file, not a folder")
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():
            raise PlannerError(f"cannot write {path}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise PlannerError(f"cannot write {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PlannerError(f"cannot write {path}: permission denied in {parent}")
    return path


def _make_parent(path: Path) -> list[Path]:
    """Create the folders ``path`` goes in; returns those it made (deepest first), for :func:`_unmake`."""
    made, parent = [], path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PlannerError(f"cannot write {path}: a file is in the way of its folder") from None
    except OSError as exc:
        _unmake(made)
        raise PlannerError(f"cannot write {path}: {os_reason(exc)}") from None
    return made


def _unmake(made: list[Path]) -> None:
    """Remove the folders a failed write created (if still empty): a failure leaves nothing new behind."""
    for folder in made:
        try:
            os.rmdir(folder)
        except OSError:
            return


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed.

    OS errors (a read-only folder, a full disk, ``path`` being a folder) become PlannerError naming ``path``."""
    path = Path(path)
    if path.is_dir():
        raise PlannerError(f"cannot write {path}: it is a folder")
    made = _make_parent(path)
    remove_leftovers(path)
    tmp = path.parent / _temp_name(path.name, "tmp")
    done = False
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask decides, as for any file
        yield tmp
        os.replace(tmp, path)
        done = True
    except OSError as exc:
        raise PlannerError(f"cannot write {path}: {os_reason(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not done:
            _unmake(made)


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_text(obj: Any) -> str:
    """``obj`` as indented, strict JSON with a final newline (non-finite numbers as strings, see :func:`json_safe`)."""
    return json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON (with a final newline; see :func:`json_safe`) to ``path`` atomically."""
    return write_text_atomic(path, json_text(obj))


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON has none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- writing folders
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` when this
    system or file system cannot, OSError for any other failure."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _fsync_tree(folder: Path) -> None:
    """Flush the files of ``folder`` (and the folders) to disk before they are published."""
    for root, _dirs, files in os.walk(folder):
        for name in files + [""]:
            target = os.path.join(root, name) if name else root
            with contextlib.suppress(OSError):
                fd = os.open(target, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def swap_in(staging: Path, path: Path) -> None:
    """Make the complete folder ``staging`` the folder ``path`` (see the module docstring for the protocol);
    the previous ``path``, if any, is removed."""
    if not os.path.lexists(path):
        try:
            os.rename(staging, path)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # else another writer just made it: swap
                raise
    if rename_exchange(staging, path):
        _remove(staging)  # it holds the old folder now
        return
    old = path.parent / _temp_name(path.name, "old")
    os.rename(path, old)
    try:
        os.rename(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, path)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, keep_empty: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block ends without error it becomes
    ``path`` as a whole (the previous folder is replaced, not merged), else it is removed.

    ``keep_empty=False``: a block that leaves the folder empty removes ``path`` instead of leaving an
    empty folder there. OS errors become PlannerError naming ``path``."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise PlannerError(f"cannot write {path}: it is a file, not a folder")
    made = _make_parent(path)
    recover_folder(path)
    remove_leftovers(path)
    staging = path.parent / _temp_name(path.name, "tmp")
    try:
        os.mkdir(staging)
    except OSError as exc:
        _unmake(made)
        raise PlannerError(f"cannot write {path}: {os_reason(exc)}") from None
    done = False
    try:
        yield staging
        if not keep_empty and not any(staging.iterdir()):
            if path.is_dir():
                old = path.parent / _temp_name(path.name, "tmp")  # a leftover to remove, never to restore
                os.rename(path, old)  # one step: readers see the folder or nothing
                _remove(old)
            return
        _fsync_tree(staging)
        swap_in(staging, path)
        done = True
    except OSError as exc:
        raise PlannerError(f"cannot write {path}: {os_reason(exc)}") from None
    finally:
        if os.path.lexists(staging):
            _remove(staging)
        if not done and not os.path.lexists(path):
            _unmake(made)


def carry_over(old: Path, new: Path, carry: Callable[[Path], bool]) -> list[str]:
    """Copy the entries ``e`` of folder ``old`` with ``carry(e)`` into ``new`` where ``new`` has nothing of
    that name (hard links where possible); returns their names."""
    if not old.is_dir():
        return []
    done = []
    for entry in sorted(old.iterdir()):
        target = new / entry.name
        if os.path.lexists(target) or not carry(entry):
            continue
        done.append(entry.name)
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(entry, target)
    return done


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    # A hard link shares the bytes; the old folder's copy goes away with it, and every later write of
    # such a file (atomic: a new inode renamed in) leaves the other name untouched.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
