"""The fixture's speech stand-in: 100 s of a modulated tone + noise, louder over time, as 16-bit PCM.

Deterministic (legacy ``RandomState``), so the test regenerates exactly the samples the official code read.
"""
import numpy as np


def signal(rate: int, seconds: float = 100.0) -> np.ndarray:
    """int16 samples."""
    t = np.arange(round(seconds * rate)) / rate
    noise = np.random.RandomState(rate).standard_normal(len(t))
    sig = np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 0.3 * t)) + 0.3 * noise
    sig = sig * np.linspace(0.2, 1.0, len(t))
    return np.round(sig / np.abs(sig).max() * 0.9 * 32767).astype(np.int16)
