"""The unit of conversion: one CT/MR slice stack or one projection image, and its hashed case id."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from radsynth.configs.schema import Modality

PROJECTION_MODALITIES = ("xray",)


@dataclass
class DicomCase:
    """The files of one case: a sorted CT/MR slice stack, or one projection image."""

    identity_uid: str  # hashed into the case id; never stored
    series_uid: str  # to match labels; never stored
    modality: Modality
    paths: list[Path]
    headers: list[Dataset]

    @property
    def case_id(self) -> str:
        return "dcm_" + hashlib.sha256(self.identity_uid.encode()).hexdigest()[:12]

    @property
    def is_projection(self) -> bool:
        return self.modality in PROJECTION_MODALITIES

    @property
    def where(self) -> str:
        folder = os.path.commonpath([str(path.parent) for path in self.paths])
        return f"{folder} (series {self.case_id})"
