"""Where init artifacts live: a local folder, or a prefix in object storage (s3://, gs://, or
anything else ``pyarrow.fs.FileSystem.from_uri`` understands).

An artifact is a folder of two files (see :mod:`loraga_ray.core.artifact`). Writes never leave a
half-written artifact behind:

* locally, :meth:`InitArtifact.save` fills a temporary sibling folder and renames it into place;
* remotely, the artifact is first written to a local temporary folder, then uploaded one object
  at a time with ``meta.json`` last. Object PUTs are atomic, and a prefix without ``meta.json`` is
  not an artifact (``load`` refuses it), so a reader sees either the complete new artifact or no
  artifact. An existing ``meta.json`` is deleted before the new factors are uploaded, and
  ``meta.json`` records the sha256 of the factors: a reader refuses factors and meta of
  different writes (two writers racing on one prefix, or a copy made half-way).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .artifact import FACTORS_FILE, HEAD_FILE, META_FILE, ArtifactError, InitArtifact
from .files import OutputError, check_destination

ARTIFACT_FILES = (FACTORS_FILE, HEAD_FILE, META_FILE)

CHUNK = 8 << 20  # bytes per write when uploading or downloading


def is_remote(uri: str | os.PathLike) -> bool:
    """True for ``scheme://...`` URIs other than ``file://`` (those are local paths)."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def local_path(uri: str | os.PathLike) -> Path:
    """The local path of a plain path or a ``file://`` URI."""
    text = str(uri)
    return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()


def resolve(uri: str, filesystem=None):
    """``(filesystem, path inside it)`` for a remote URI, or for a path inside ``filesystem``."""
    if filesystem is not None:
        return filesystem, str(uri).rstrip("/")
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(str(uri))
    except Exception as e:  # unknown scheme, missing credentials, unreachable endpoint
        raise ValueError(
            f"cannot open the storage location {uri!r}: {e}. Use a local folder, s3://bucket/prefix or "
            "gs://bucket/prefix, with credentials configured the usual way (AWS_* / GOOGLE_APPLICATION_CREDENTIALS "
            "or the instance's role)."
        ) from e
    return fs, path.rstrip("/")


def _copy_stream(src, dst) -> int:
    n = 0
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            return n
        dst.write(chunk)
        n += len(chunk)


def _upload_file(local: Path, fs, path: str) -> int:
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        return _copy_stream(src, dst)


def _exists(fs, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def check_artifact_destination(uri: str | os.PathLike, *, overwrite: bool = False, filesystem=None) -> None:
    """Raise :class:`~loraga_ray.core.files.OutputError`, touching nothing, unless an artifact may
    be written at ``uri``: nothing there, or (with ``overwrite``) an artifact. Remotely, objects
    under the prefix other than an artifact's files are never overwritten."""
    if filesystem is None and not is_remote(uri):
        check_destination(local_path(uri), "init artifact", overwrite)
        return
    import pyarrow.fs

    fs, path = resolve(str(uri), filesystem)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    names = {info.path[len(path):].lstrip("/") for info in infos if info.type == pyarrow.fs.FileType.File}
    foreign = sorted(names - set(ARTIFACT_FILES))
    if foreign:
        raise OutputError(f"{uri} already holds objects that are not an init artifact ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); nothing was touched. Choose another prefix.")
    if META_FILE in names and not overwrite:
        raise OutputError(f"{uri} already holds an init artifact. Pass --overwrite (API: overwrite=True) to replace "
                          "it, or choose another prefix.")


def save_artifact(artifact: InitArtifact, uri: str | os.PathLike, *, overwrite: bool = False, filesystem=None) -> str:
    """Write ``artifact`` to a local folder or a remote prefix; returns where it went. An existing
    artifact is replaced only with ``overwrite``; anything else there is refused.

    ``filesystem``: a ``pyarrow.fs.FileSystem`` to write into instead of resolving ``uri``
    (then ``uri`` is a path inside it), e.g. an ``S3FileSystem`` with explicit credentials.
    """
    if filesystem is None and not is_remote(uri):
        return str(artifact.save(local_path(uri), overwrite=overwrite))
    check_artifact_destination(uri, overwrite=overwrite, filesystem=filesystem)
    fs, path = resolve(str(uri), filesystem)
    with tempfile.TemporaryDirectory(prefix="loraga-ray-upload-") as tmp:
        folder = artifact.save(Path(tmp) / "artifact")
        fs.create_dir(path, recursive=True)
        meta_path = f"{path}/{META_FILE}"
        if _exists(fs, meta_path):
            fs.delete_file(meta_path)  # from here on the prefix is "no artifact" until the new meta lands
        written = set(os.listdir(folder))
        for name in ARTIFACT_FILES:
            if name != META_FILE and name not in written and _exists(fs, f"{path}/{name}"):
                fs.delete_file(f"{path}/{name}")  # the replaced artifact's head, which this one lacks
        for name in sorted(written):
            if name not in (META_FILE, ".loraga-ray.json"):
                _upload_file(folder / name, fs, f"{path}/{name}")
        _upload_file(folder / META_FILE, fs, meta_path)  # the commit point
    return str(uri)


def load_artifact(uri: str | os.PathLike, *, filesystem=None) -> InitArtifact:
    """Read an artifact from a local folder or a remote prefix."""
    if filesystem is None and not is_remote(uri):
        return InitArtifact.load(local_path(uri))
    fs, path = resolve(str(uri), filesystem)
    if not _exists(fs, f"{path}/{META_FILE}"):
        raise ArtifactError(
            f"{uri} is not an init artifact (no {META_FILE}; an interrupted upload leaves none). "
            "Create one with `loraga-ray init --out URI`."
        )
    tmp = Path(tempfile.mkdtemp(prefix="loraga-ray-download-"))
    try:
        names = [FACTORS_FILE, META_FILE] + ([HEAD_FILE] if _exists(fs, f"{path}/{HEAD_FILE}") else [])
        for name in names:
            try:
                with fs.open_input_stream(f"{path}/{name}") as src, open(tmp / name, "wb") as dst:
                    _copy_stream(src, dst)
            except FileNotFoundError:
                raise ArtifactError(f"{uri} lacks {name}; it is not a complete init artifact.") from None
        return InitArtifact.load(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
