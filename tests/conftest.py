"""Shared fixtures: tiny on-disk datasets in every source format, and the real reference data when present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from radsynth.configs import load_config  # noqa: E402
from radsynth.pipelines.data.io import write_nifti, write_png  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RADSYNTH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The real reference images in ../shared/data; tests that use them skip when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real reference data not found at {SHARED_DATA}")
    return SHARED_DATA


def blob_volume(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """An image with two labelled blobs on a textured background (not constant, labels 0..2)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    centre = rng.uniform(-0.3, 0.3, size=(len(shape),) + (1,) * len(shape))
    radius = np.sqrt(((grid - centre) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[radius < 0.5] = 1
    label[radius < 0.25] = 2
    image = (100 + 200 * label.astype(np.float32) + rng.normal(0, 10, shape)).astype(np.float32)
    return image, label


def write_msd_folder(root: Path, n_cases: int = 6, shape=(12, 14, 10), dialect: str = "msd", seed: int = 0) -> Path:
    """An MSD (``case.nii.gz``) or nnU-Net v2 (``case_0000.nii.gz``) raw folder with dataset.json."""
    rng = np.random.default_rng(seed)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    for index in range(n_cases):
        image, label = blob_volume(rng, shape)
        case = f"case_{index:03d}"
        image_name = f"{case}_0000.nii.gz" if dialect == "nnunet" else f"{case}.nii.gz"
        write_nifti(root / "imagesTr" / image_name, image, affine)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine)
    if dialect == "nnunet":
        meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "numTraining": n_cases, "file_ending": ".nii.gz"}
    else:
        meta = {"name": "toy", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "organ", "2": "lesion"},
                "licence": "CC0"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def write_image_folder(root: Path, n_cases: int = 8, shape=(40, 36), seed: int = 0, bits: int = 16,
                       suffix: str = ".png") -> Path:
    """Images (16/8-bit PNG or JPEG) + 0/255 PNG masks + a CSV with two images per patient and attributes."""
    rng = np.random.default_rng(seed)
    rows = ["id,patientid,finding,sex,age,report"]
    for index in range(n_cases):
        image, label = blob_volume(rng, shape)
        scaled = (image - image.min()) / (image.max() - image.min())
        pixels = (scaled * (65535 if bits == 16 else 255)).astype(np.uint16 if bits == 16 else np.uint8)
        if suffix == ".png":
            write_png(root / "images" / f"img{index:03d}.png", pixels)
        else:
            (root / "images").mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(pixels).save(root / "images" / f"img{index:03d}{suffix}", quality=95)
        write_png(root / "masks" / f"img{index:03d}.png", ((label > 0) * 255).astype(np.uint8))
        finding = "nodule" if index % 4 == 0 else "none"
        rows.append(f"img{index:03d},p{index // 2},{finding},{'MF'[index % 2]},{40 + index},chest film {index}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def msd_config(tmp_path):
    """A config factory for an MSD folder written under tmp_path."""

    def make(*overrides: str, dialect: str = "msd", n_cases: int = 6):
        root = write_msd_folder(tmp_path / "msd", n_cases=n_cases, dialect=dialect)
        return load_config(
            REPO / "configs" / "hippocampus.yaml",
            [f"data.root={root}", "data.label_names=null", "data.modality=null" if dialect == "msd" else "data.modality=ct",
             "data.preprocess.target_shape=[16,16,16]", "data.preprocess.target_spacing=[1.5,1.5,1.5]",
             f"runtime.output_dir={tmp_path / 'run'}", *overrides],
        )

    return make


@pytest.fixture
def tiny_bert(tmp_path):
    """A random 2-layer BERT + a WordPiece tokenizer from a local vocab file, saved as transformers does."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "nodule", "left", "right", "effusion", "mm", "8", "-"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the session's in-process flows (its cold start takes 18-31 s here)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
