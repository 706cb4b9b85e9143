"""Atomic, idempotent, versioned publishing of a release folder.

Layout under the release root (``<destination>/<name>``)::

    v1/ v2/ ...        complete releases; each holds MANIFEST.sha256 (every file's sha256, and the build's fingerprint)
    latest -> v2       a relative symlink, swapped atomically
    .staging-*         a release being written (removed by the next publish if a crash left it)

A release is written into a staging folder, its manifest is written and verified by reading every file back,
and only then is the folder renamed to ``vN`` (one atomic rename) and ``latest`` swapped (another). A crash at
any point leaves the previous release or the new one, never a mix. Publishing a build whose fingerprint an
existing version already carries writes nothing and points ``latest`` at that version.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "MANIFEST.sha256"
LATEST = "latest"
_VERSION = re.compile(r"^v(\d+)$")
_FINGERPRINT_LINE = "# fingerprint "


class ManifestError(RuntimeError):
    """A release folder does not match its manifest."""


@dataclass(frozen=True)
class Published:
    folder: Path  # the version folder, e.g. <root>/v3
    version: str
    reused: bool  # True: this build was already released; nothing was written


def publish(root: str | Path, fingerprint: str, write: Callable[[Path, str], None], keep: int = 5) -> Published:
    """Write a new version of the release at ``root`` with ``write(staging_folder, version)``, unless one exists.

    fingerprint: identifies the build (inputs, settings, gate result); equal fingerprints mean equal releases.
    keep: complete versions kept; older ones are removed after the new one is in place.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root):
        return _publish_locked(root, fingerprint, write, keep)


def _publish_locked(root: Path, fingerprint: str, write: Callable[[Path, str], None], keep: int) -> Published:
    _remove_leftovers(root)
    existing = next((v for v in versions(root) if manifest_fingerprint(v) == fingerprint), None)
    if existing is not None:
        _point_latest(root, existing)
        return Published(existing, existing.name, reused=True)

    target = root / f"v{_next_version_number(root)}"
    staging = root / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        write(staging, target.name)
        write_manifest(staging, fingerprint)
        verify_manifest(staging)
        _sync_tree(staging)  # on disk before the name says complete: a power cut cannot leave an empty vN
        os.rename(staging, target)
        _sync(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _point_latest(root, target)
    _sync(root)
    _prune(root, keep)
    return Published(target, target.name, reused=False)


@contextmanager
def _exclusive(root: Path):
    """One publisher per release root at a time (a second one waits): leftovers are only removed under the lock."""
    with (root / ".publish.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def versions(root: str | Path) -> list[Path]:
    """Complete version folders, oldest first."""
    root = Path(root)
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and not p.is_symlink()
             and (m := _VERSION.match(p.name))] if root.is_dir() else []
    return [path for _, path in sorted(found)]


def latest(root: str | Path) -> Path | None:
    link = Path(root) / LATEST
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def write_manifest(folder: Path, fingerprint: str) -> Path:
    lines = [f"{_FINGERPRINT_LINE}{fingerprint}"]
    lines += [f"{_sha256(path)}  {path.relative_to(folder).as_posix()}" for path in _files(folder)]
    path = folder / MANIFEST
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def verify_manifest(folder: str | Path) -> None:
    """Raise ``ManifestError`` unless every file is listed with its sha256 and every listed file exists."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST}")
    listed = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            digest, name = line.split("  ", 1)
            listed[name] = digest
    present = {path.relative_to(folder).as_posix(): path for path in _files(folder)}
    if set(listed) != set(present):
        raise ManifestError(f"{folder}: files differ from the manifest: missing {sorted(set(listed) - set(present))}, "
                            f"unlisted {sorted(set(present) - set(listed))}")
    for name, digest in listed.items():
        if _sha256(present[name]) != digest:
            raise ManifestError(f"{folder}: {name} does not match its sha256")


def manifest_fingerprint(folder: Path) -> str | None:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    first = manifest.read_text(encoding="utf-8").splitlines()[:1]
    return first[0][len(_FINGERPRINT_LINE):] if first and first[0].startswith(_FINGERPRINT_LINE) else None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sync(path: Path) -> None:
    """fsync a file, or a folder (its entries: names created or renamed in it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders that name them
        if not path.is_symlink():
            _sync(path)
    _sync(folder)


def _next_version_number(root: Path) -> int:
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.match(p.name))]
    return max(numbers, default=0) + 1


def _point_latest(root: Path, target: Path) -> None:
    link = root / LATEST
    if link.is_symlink() and os.readlink(link) == target.name:
        return
    temporary = root / f".latest-{uuid.uuid4().hex}"
    temporary.symlink_to(target.name, target_is_directory=True)
    os.replace(temporary, link)  # atomic: readers see the old target or the new one


def _prune(root: Path, keep: int) -> None:
    current = latest(root)
    for old in versions(root)[:-keep]:
        if old != current:
            _remove(root, old)


def _remove(root: Path, folder: Path) -> None:
    # Renamed away first, so that a crash mid-delete leaves no half-deleted version behind a version name.
    trash = root / f".trash-{uuid.uuid4().hex}"
    os.rename(folder, trash)
    shutil.rmtree(trash)


def _remove_leftovers(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith((".staging-", ".trash-", ".latest-")):
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
