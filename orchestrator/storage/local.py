"""Local-filesystem object store, for ``file://`` and ``pvc://`` URIs.

Keys map to paths under a root directory. Writes go to a temp file in the destination
directory and are renamed into place, so a crash never leaves a half-written object.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from orchestrator.storage.base import (
    Callback,
    ObjectInfo,
    ObjectStore,
    atomic_write_bytes,
    temp_path,
)
from orchestrator.storage.checksum import is_temp_name, new_hasher
from orchestrator.storage.errors import (
    BucketNotFoundError,
    CredentialsError,
    LocalDiskError,
    ObjectNotFoundError,
    StorageError,
    local_fault,
)
from orchestrator.storage.uri import StorageURI

_COPY_CHUNK = 4 << 20


class LocalStore(ObjectStore):
    """``root`` is ``/`` for ``file://`` URIs and the claim's mount for ``pvc://``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        base: StorageURI | None = None,
        must_exist: bool = False,
        progress: bool | None = None,
        workers: int = 4,
    ) -> None:
        super().__init__(progress=progress, workers=workers, retries=1)
        self.root = Path(root)
        # How keys are spelled back to the user: file:///abs or pvc://claim/path.
        self.base = base or StorageURI("file", "", self.root.as_posix().strip("/"))
        if must_exist and not self.root.is_dir():
            # A PVC that is not mounted: the pod spec lacks the volume, or the claim is wrong.
            raise BucketNotFoundError(
                f"{self.uri()} is not mounted (expected a directory at {self.root})", self.uri()
            )

    def uri(self, key: str = "") -> str:
        return str(self.base.join(key)) if key else str(self.base)

    def path(self, key: str) -> Path:
        return self.root / key.strip("/") if key.strip("/") else self.root

    # ---- primitives -------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo:
        p = self.path(key)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"no such object: {self.uri(key)}", self.uri(key)) from None
        except OSError as exc:
            raise self._translate(exc, key) from exc
        if not p.is_file():
            raise ObjectNotFoundError(
                f"no such object: {self.uri(key)} (it is a directory)", self.uri(key)
            )
        return ObjectInfo(key.strip("/"), st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}")

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in filenames:
                if is_temp_name(name):
                    continue
                full = Path(dirpath) / name
                if not full.is_file():
                    continue
                st = full.stat()
                key = full.relative_to(self.root).as_posix()
                out.append(ObjectInfo(key, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}"))
        return sorted(out, key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFoundError(f"no such object: {self.uri(key)}", self.uri(key)) from None
        except OSError as exc:
            raise self._translate(exc, key) from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            atomic_write_bytes(self.path(key), data)
        except OSError as exc:
            raise self._translate(exc, key) from exc

    def delete_prefix(self, prefix: str) -> int:
        p = self.path(prefix)
        if p == self.root and not prefix.strip("/"):
            # Deleting a whole root ("/" for file://) is never what anyone meant.
            raise StorageError(f"refusing to delete the root of {self.uri()}", self.uri())
        if p.is_file() or p.is_symlink():
            p.unlink()
            return 1
        if p.is_dir():
            count = sum(len(files) for _, _, files in os.walk(p))
            shutil.rmtree(p)
            return count
        return 0

    def _put_file(
        self, local: Path, key: str, callback: Callback, digests: dict[str, str]
    ) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(dest)
        try:
            _copy(local, tmp, callback)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _get_file(self, key: str, dest: Path, callback: Callback, size: int) -> None:
        self._download_to(ObjectInfo(key, size), dest, callback, None)

    def _download_to(
        self, info: ObjectInfo, tmp: Path, callback: Callback, algorithm: str | None
    ) -> str | None:
        src = self.path(info.key)
        if not src.is_file():
            raise ObjectNotFoundError(f"no such object: {self.uri(info.key)}", self.uri(info.key))
        h = new_hasher(algorithm) if algorithm else None
        _copy(src, tmp, callback, h)
        return h.hexdigest() if h is not None else None

    def _translate(self, exc: BaseException, key: str) -> BaseException:
        uri = self.uri(key)
        if isinstance(exc, PermissionError):
            return CredentialsError(f"permission denied: {uri} ({exc.strerror})", uri)
        if isinstance(exc, OSError) and local_fault(exc) is not None:
            return LocalDiskError(f"{exc.strerror or exc} writing {uri}", uri, errno=exc.errno,
                                  path=exc.filename)
        if isinstance(exc, OSError):
            return StorageError(f"{uri}: {exc.strerror or exc}", uri)
        return exc

    def _dir_exists(self, prefix: str) -> bool:
        return self.path(prefix).is_dir()


def _copy(src: Path, dest: Path, callback: Callback, h: Any = None) -> None:
    """Copy in 4 MiB chunks, hashing on the way when given a hasher."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(_COPY_CHUNK):
            fout.write(chunk)
            if h is not None:
                h.update(chunk)
            callback(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())
