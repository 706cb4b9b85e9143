"""Error messages shared by the DICOM readers: a broken file is named, its problem told in one short line."""

from __future__ import annotations

from pathlib import Path

from radsynth.configs.errors import UserInputError


def unreadable(path: Path, problem: str) -> UserInputError:
    return UserInputError(path, f"unreadable or truncated DICOM file ({problem})", "repair or remove the file")


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]
