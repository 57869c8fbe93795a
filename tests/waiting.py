"""Polling helper shared by the fault tests."""

from __future__ import annotations

import time


def wait_for(pred, timeout: float = 120.0, step: float = 0.05) -> bool:
    """Call `pred` every `step` seconds until it is true (-> True) or `timeout` seconds pass (-> False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return False
