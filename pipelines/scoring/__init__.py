"""Scoring: realism, conditioning adherence, privacy leakage and utility of synthetic images."""
