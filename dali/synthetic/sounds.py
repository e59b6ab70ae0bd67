"""Procedural sounds of the synthetic world's sources, at 16 kHz, with per-clip variation (pitch, rhythm).

Each generator takes a numpy Generator and a duration in seconds and returns float32 samples peaking near 1.
"""

from __future__ import annotations

import numpy as np

from dali.constants import SAMPLE_RATE

RATE = SAMPLE_RATE


def _time(duration: float) -> np.ndarray:
    return np.arange(int(duration * RATE)) / RATE


def _envelope(n: int, attack: float, decay: float) -> np.ndarray:
    t = np.arange(n) / RATE
    return np.minimum(t / max(attack, 1e-4), 1.0) * np.exp(-t / decay)


def _place(out: np.ndarray, event: np.ndarray, start: float) -> None:
    begin = int(start * RATE)
    end = min(begin + event.size, out.size)
    if begin < out.size:
        out[begin:end] += event[: end - begin]


def _band_noise(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[(freqs < low) | (freqs > high)] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.abs(noise).max() + 1e-9)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def bark(rng, duration):
    out = np.zeros(int(duration * RATE))
    count = rng.integers(2, 6)
    for start in np.sort(rng.uniform(0, max(duration - 0.3, 0.1), count)):
        length = rng.uniform(0.12, 0.2)
        t = _time(length)
        f0 = rng.uniform(350, 600) * (1 - 0.3 * t / length)
        phase = 2 * np.pi * np.cumsum(f0) / RATE
        tone = sum(np.sin(k * phase) / k for k in range(1, 6)) + 0.3 * rng.standard_normal(t.size)
        _place(out, tone * _envelope(t.size, 0.01, length / 3), start)
    return _normalise(out)


def bell(rng, duration):
    out = np.zeros(int(duration * RATE))
    f0 = rng.uniform(700, 1100)
    for start in np.sort(rng.uniform(0, max(duration - 1.0, 0.1), rng.integers(1, 4))):
        t = _time(min(1.5, duration))
        tone = sum(a * np.sin(2 * np.pi * f0 * r * t) for r, a in ((1, 1), (2.0, 0.6), (2.76, 0.4), (5.4, 0.2)))
        _place(out, tone * _envelope(t.size, 0.002, 0.5), start)
    return _normalise(out)


def engine(rng, duration):
    t = _time(duration)
    f0 = rng.uniform(50, 90) * (1 + 0.1 * np.sin(2 * np.pi * 0.2 * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    hum = sum(np.sin(k * phase) / k for k in range(1, 9)) * (1 + 0.4 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
    pass_by = np.exp(-(((t - duration * rng.uniform(0.4, 0.6)) / (duration / 3)) ** 2))
    return _normalise((hum + 0.2 * _band_noise(rng, t.size, 50, 400)) * pass_by)


def chirp(rng, duration):
    out = np.zeros(int(duration * RATE))
    base = rng.uniform(2500, 3500)
    for group in np.sort(rng.uniform(0, max(duration - 0.6, 0.1), rng.integers(2, 5))):
        for k in range(rng.integers(2, 5)):
            length = rng.uniform(0.05, 0.08)
            t = _time(length)
            sweep = base + rng.uniform(1000, 1800) * t / length
            _place(out, np.sin(2 * np.pi * np.cumsum(sweep) / RATE) * np.hanning(t.size), group + k * 0.12)
    return _normalise(out)


def stream(rng, duration):
    n = int(duration * RATE)
    t = _time(duration)
    flow = _band_noise(rng, n, rng.uniform(300, 500), rng.uniform(2000, 3000))
    return _normalise(flow * (0.7 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t)) * np.minimum(t / 0.3, 1))


def drum(rng, duration):
    out = np.zeros(int(duration * RATE))
    period = rng.uniform(0.3, 0.6)
    f0 = rng.uniform(70, 110)
    for start in np.arange(rng.uniform(0, 0.2), duration - 0.3, period):
        t = _time(0.3)
        hit = np.sin(2 * np.pi * np.cumsum(f0 * (1 + np.exp(-t / 0.03))) / RATE) + 0.2 * rng.standard_normal(
            t.size
        ) * np.exp(-t / 0.01)
        _place(out, hit * _envelope(t.size, 0.002, 0.12), start)
    return _normalise(out)


def siren(rng, duration):
    t = _time(duration)
    freq = rng.uniform(800, 1000) + rng.uniform(250, 400) * np.sin(2 * np.pi * rng.uniform(0.3, 0.6) * t)
    return _normalise(np.sin(2 * np.pi * np.cumsum(freq) / RATE) * np.minimum(t / 0.2, 1))


def whistle(rng, duration):
    t = _time(duration)
    freq = rng.uniform(1800, 2600) + 25 * np.sin(2 * np.pi * 5 * t)
    gate = (np.sin(2 * np.pi * rng.uniform(0.3, 0.7) * t) > -0.5).astype(float)
    gate = np.convolve(gate, np.ones(400) / 400, mode="same")
    return _normalise(np.sin(2 * np.pi * np.cumsum(freq) / RATE) * gate)


def tick(rng, duration):
    out = np.zeros(int(duration * RATE))
    click = _band_noise(rng, 160, 3000, 7000) * np.exp(-np.arange(160) / 30)
    for start in np.arange(rng.uniform(0, 0.5), duration - 0.02, 1 / rng.uniform(1.5, 3.0)):
        _place(out, click, start)
    return _normalise(out)


def ring(rng, duration):
    out = np.zeros(int(duration * RATE))
    scale = rng.uniform(0.9, 1.2)
    t = _time(0.4)
    burst = (np.sin(2 * np.pi * 440 * scale * t) + np.sin(2 * np.pi * 480 * scale * t)) * np.minimum(t / 0.01, 1)
    for start in np.arange(0, duration - 0.4, 2.0):
        _place(out, burst, start)
        _place(out, burst, start + 0.6)
    return _normalise(out)


def knock(rng, duration):
    """Groups of 2-4 dull knocks: a wooden body's low resonance under a short broadband hit. Two sources of the
    world (a hammer, a door) make this same sound, so only a picture tells them apart."""
    out = np.zeros(int(duration * RATE))
    f0 = rng.uniform(180, 320)
    t = _time(0.12)
    start = rng.uniform(0, 0.4)
    while start < duration - 0.5:
        gap = rng.uniform(0.18, 0.3)
        for k in range(int(rng.integers(2, 5))):
            hit = _band_noise(rng, t.size, 300, 2500) * np.exp(-t / 0.01) + np.sin(2 * np.pi * f0 * t) * np.exp(
                -t / 0.04
            )
            _place(out, hit, start + k * gap)
        start += rng.uniform(1.0, 1.8)
    return _normalise(out)


def background(rng, duration):
    return _band_noise(rng, int(duration * RATE), 50, 7000).astype(np.float32)
