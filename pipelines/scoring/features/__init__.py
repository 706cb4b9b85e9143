"""Feature spaces for scoring, all behind one interface (``FeatureExtractor``).

F0 ``RandomCNNFeatures``: a seeded random CNN, the sanity baseline. F1 ``RadiomicsFeatures``: weight-free
radiomics-style statistics, per label region when masks exist. F2 ``SelfSupervisedEncoder``: a SimCLR encoder
trained on train + holdout. Each maps images (N, *spatial) on [-1, 1] to float64 (N, F), independent of the
batch size. ``augment`` is the shared strong augmentation (also used to make near copies for privacy tests).
"""

from __future__ import annotations

from .augment import augment
from .base import FeatureExtractor
from .radiomics import RadiomicsFeatures
from .random_cnn import RandomCNNFeatures
from .self_supervised import SelfSupervisedEncoder, nt_xent_loss

__all__ = ["FeatureExtractor", "RadiomicsFeatures", "RandomCNNFeatures", "SelfSupervisedEncoder", "augment",
           "nt_xent_loss"]
