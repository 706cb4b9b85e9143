"""Adapters turn a source folder (or the built-in phantom generator) into manifest records.

Each adapter is ``read_<format>(data: DataSource, work_dir: Path) -> list[CaseRecord]``. ``work_dir`` is where
an adapter may write files it derives (phantom images, DICOM series converted to NIfTI); records point at
files that ``radsynth.pipelines.data.io.read_image`` reads. Adapters check structure (files present, columns,
series geometry); voxel content (NaN, label values, shapes) is checked once, for every source, in ``checks``.
"""

from __future__ import annotations

from pathlib import Path

from radsynth.configs.schema import DataSource

from ..manifest import CaseRecord


def read_source(data: DataSource, work_dir: Path) -> list[CaseRecord]:
    # Imported here so that a source's optional dependencies load only when that source is used.
    if data.format == "msd":
        from .msd import read_msd as reader
    elif data.format == "image_folder":
        from .image_folder import read_image_folder as reader
    elif data.format == "dicom":
        from .dicom import read_dicom as reader
    else:
        from .phantom import read_phantom as reader
    return reader(data, Path(work_dir))
