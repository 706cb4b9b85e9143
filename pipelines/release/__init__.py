"""Release: per-sample privacy filter, dataset-level gate, formats, dataset card, HTML report, atomic publish."""

from .gate import GateCheck, GateResult, evaluate_gates
from .publish import publish, verify_manifest
from .stage import ReleaseRefused, ReleaseResult, release, release_root

__all__ = ["GateCheck", "GateResult", "ReleaseRefused", "ReleaseResult", "evaluate_gates", "publish", "release",
           "release_root", "verify_manifest"]
