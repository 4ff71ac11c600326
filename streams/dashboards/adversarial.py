"""Adversarial: query-based black-box attacks and evasion inputs."""

from __future__ import annotations

from streams.dashboards.extraction import inference_panels
from streams.dashboards.family import family_dashboard

UID = "modelwatch-adversarial"


def build() -> dict:
    return family_dashboard(
        "adversarial", UID, "modelwatch / Adversarial",
        "Adversarial inputs (MITRE ATLAS AML.T0043): query crowding, low-margin answers, "
        "out-of-distribution and out-of-bounds queries",
        *inference_panels("adversarial"))
