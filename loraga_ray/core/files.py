"""Writing outputs so that nothing is lost: a reader never sees a half-written folder, a folder
loraga-ray did not write is never deleted or overwritten, replacing one of our own outputs needs
``overwrite=True`` (``--overwrite``) and keeps the old one on disk until the new one is complete,
and only one writer works on an output at a time.

Every folder written through :func:`atomic_folder` carries a marker file (``.loraga-ray.json``:
its kind and the version that wrote it), which is how a later write recognises it as ours.
Outputs of 0.1.0, written before the marker existed, are recognised by their layout
(:func:`output_kind`)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

MARKER = ".loraga-ray.json"
_RENAME_EXCHANGE = 2  # linux/fs.h
_held_locks: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth): re-entrant within a process


class OutputError(ValueError):
    """An output destination that cannot be written without losing something, or that another
    run is writing."""


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of loraga-ray output ``path`` holds (``"init artifact"``, ``"adapter"``,
    ``"merged model"``, ``"training run"``, ``"search"``, ``"demo"``), or None when it holds none."""
    path = Path(path)
    marker = path / MARKER
    if marker.is_file():
        with contextlib.suppress(ValueError, OSError):
            return json.loads(marker.read_text()).get("kind")
    meta = path / "meta.json"
    if meta.is_file():  # an init artifact of 0.1.0
        with contextlib.suppress(ValueError, OSError):
            if json.loads(meta.read_text()).get("format") == "loraga-ray-init":
                return "init artifact"
    if (path / "train_options.json").is_file() or (path / "run.json").is_file():
        return "training run"
    if (path / "search.json").is_file():
        return "search"
    if (path / "summary.json").is_file() and (path / "init").is_dir():  # a demo folder of 0.1.0
        return "demo"
    return None


def write_marker(folder: str | os.PathLike, kind: str, **extra) -> None:
    from .. import __version__

    marker = {"kind": kind, "written_by": f"loraga-ray {__version__}", **extra}
    (Path(folder) / MARKER).write_text(json.dumps(marker) + "\n")


def read_marker(folder: str | os.PathLike) -> dict:
    """The marker of a folder we wrote ({} when there is none or it does not parse)."""
    with contextlib.suppress(ValueError, OSError):
        marker = json.loads((Path(folder) / MARKER).read_text())
        return marker if isinstance(marker, dict) else {}
    return {}


def check_destination(dest: str | os.PathLike, kind: str, overwrite: bool = False) -> None:
    """Raise :class:`OutputError`, touching nothing, unless ``dest`` may receive a new ``kind``:
    it does not exist, is an empty folder, or (with ``overwrite``) holds our own ``kind``."""
    dest = Path(dest)
    if not dest.exists():
        return
    if not dest.is_dir():
        raise OutputError(f"{dest} is an existing file, not a folder; nothing was written. Choose another output path.")
    if not any(dest.iterdir()):
        return
    found = output_kind(dest)
    if found != kind:
        what = f"a loraga-ray {found}" if found else "files loraga-ray did not write"
        raise OutputError(
            f"{dest} already exists and holds {what}, not a loraga-ray {kind}; nothing in it was touched. "
            "Choose another output folder, or move that one away yourself."
        )
    if not overwrite:
        raise OutputError(
            f"{dest} already holds a loraga-ray {kind}. Pass --overwrite (API: overwrite=True) to replace it (the "
            "old one is kept until the new one is complete), or choose another output folder."
        )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0


def _leftovers(dest: Path) -> tuple[list[Path], list[Path]]:
    """(.tmp-*, .old-*) siblings a killed write of ``dest`` may have left."""
    parent = dest.parent
    if not parent.is_dir():
        return [], []
    tmps = sorted(parent.glob(f".{dest.name}.tmp-*"))
    olds = sorted(parent.glob(f".{dest.name}.old-*"), key=lambda p: p.stat().st_mtime)
    return tmps, olds


def recover(dest: str | os.PathLike) -> None:
    """Clean up after a write of ``dest`` that was killed: when ``dest`` is missing but its old
    copy was moved aside (a replace killed between its two renames), the old copy comes back;
    half-written temporary folders are removed. Call with the output's lock held."""
    dest = Path(dest)
    tmps, olds = _leftovers(dest)
    if not dest.exists() and olds:
        olds.pop().rename(dest)
    for p in tmps + olds:
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def output_lock(dest: str | os.PathLike) -> Iterator[None]:
    """Hold the one-writer lock of output ``dest`` (``fcntl.flock`` on a hidden ``.<name>.lock``
    beside it). A second writer, in another process or on another host sharing the file system,
    fails at once with :class:`OutputError` naming the holder's pid and host. Re-entrant within
    a process."""
    dest = Path(dest).expanduser().absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.parent / f".{dest.name}.lock"
    key = str(lock)
    if key in _held_locks:
        fd, depth = _held_locks[key]
        _held_locks[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held_locks[key]
            _held_locks[key] = (fd, depth - 1)
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputError(
            f"{dest} is being written by another loraga-ray run ({holder}); two runs on one output would "
            "corrupt it. Wait for that run, or choose another output folder."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    _held_locks[key] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _held_locks.pop(key)
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, *, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary sibling of ``dest`` to fill with a new ``kind`` output.

    Before anything is written, ``dest`` is checked (:func:`check_destination`: a folder we did
    not write is refused, our own one needs ``overwrite``) and the leftovers of a killed earlier
    write are cleaned up. On success the temporary folder, with its marker, takes ``dest``'s
    place: swapped in one step where the file system can, else by two renames with the old
    output moved aside first, so at every moment the old or the new output is complete on
    disk. On any error, Ctrl+C included, the temporary folder is removed and ``dest`` is left as
    it was. The whole write holds the output's lock."""
    dest = Path(dest)
    with output_lock(dest):
        recover(dest)
        check_destination(dest, kind, overwrite)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            yield tmp
            write_marker(tmp, kind)
            _put_in_place(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _put_in_place(new: Path, dest: Path) -> None:
    if not dest.exists():
        new.rename(dest)
        return
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
        new.rename(dest)
        return
    if _exchange(new, dest):  # dest is the new output now; ``new`` holds the old one
        shutil.rmtree(new, ignore_errors=True)
        return
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    dest.rename(old)  # a crash from here on: recover() puts ``old`` back
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON at ``path``, written to a hidden sibling and renamed into place;
    credentials in any string are replaced by ``***`` (:mod:`loraga_ray.redact`)."""
    from ..redact import redact_obj

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(redact_obj(obj), indent=2, default=str))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# --overwrite of outputs that are built in place over a long run (a training run, a search)
# ---------------------------------------------------------------------------------------------

REPLACED = ".replaced-"  # ``.<name>.replaced-<id>``: our old output, moved aside while its replacement runs


def _replaced(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}{REPLACED}*"))


def recover_replaced(dest: str | os.PathLike, kind: str, complete, resume: bool = False) -> None:
    """After a replacement that was killed: when ``dest`` holds a complete new output
    (``complete(dest)``) the old one moved aside is removed; otherwise the half-made new one
    (ours: refused if it is not) is removed and the old one comes back. With ``resume`` the
    half-made new one is what the user continues: both stay (the old one until the resumed run
    completes). Call with the lock held."""
    dest = Path(dest)
    for aside in _replaced(dest):
        if dest.exists() and complete(dest):
            shutil.rmtree(aside, ignore_errors=True)
            continue
        if resume and (dest / MARKER).is_file():
            continue
        if dest.exists():
            if any(dest.iterdir()) and not (dest / MARKER).is_file():
                raise OutputError(f"{dest} holds files loraga-ray did not write, and the {kind} it replaced waits at "
                                  f"{aside}; nothing was touched. Move one of them away yourself.")
            _put_back(aside, dest)
        else:
            aside.rename(dest)


def _put_back(aside: Path, dest: Path) -> None:
    """The old output back at ``dest``, the half-made new one out of the way first (a rename,
    so files still held open there cannot block the restore), then removed."""
    trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    trash.rmdir()
    dest.rename(trash)
    aside.rename(dest)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def replacing(dest: str | os.PathLike, kind: str, complete, overwrite: bool, resume: bool = False) -> Iterator[None]:
    """The body makes a new ``kind`` in place at ``dest``. With ``overwrite`` and our own old
    ``kind`` there (with our marker: nothing else is ever moved), the old one is first moved aside
    (one rename) and stays there until the body returns; if the body fails, Ctrl+C included, the
    half-made new one is removed and the old one put back, and a killed process leaves both for
    :func:`recover_replaced` to sort out on the next run (``resume``: continue the half-made one).
    So at every moment the old or a complete new output exists. Without ``overwrite`` it only
    recovers. Call with the output's lock held."""
    dest = Path(dest)
    recover_replaced(dest, kind, complete, resume)
    if not (overwrite and dest.is_dir() and any(dest.iterdir())):
        yield
        if _replaced(dest) and complete(dest):  # a resumed replacement that has now completed
            recover_replaced(dest, kind, complete)
        return
    check_destination(dest, kind, overwrite=True)  # refuses, touching nothing, what is not ours
    if not (dest / MARKER).is_file():
        raise OutputError(f"{dest} has no {MARKER}: it was not written by this version of loraga-ray, so --overwrite "
                          "leaves it alone. Move it away yourself, or choose another --out.")
    aside = dest.parent / f".{dest.name}{REPLACED}{uuid.uuid4().hex[:12]}"
    dest.rename(aside)
    try:
        yield
    except BaseException:
        if dest.exists():
            _put_back(aside, dest)
        else:
            aside.rename(dest)
        raise
    shutil.rmtree(aside, ignore_errors=True)
