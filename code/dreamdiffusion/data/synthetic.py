"""Synthetic ImageNet-EEG and unpaired EEG, written in the real file formats.

Used by the tests and by the demo (never in place of real data: nothing reads these unless given
their paths). Everything is deterministic for a given seed.

Stimuli: each class is a combination of shape x colour x texture ("red striped circle"); each
image varies position, size, rotation and background (`draw_stimulus`).

EEG (`SyntheticEEG`), sampled at 1 kHz like ImageNet-EEG:
  trial = background + signal_strength * evoked, band-passed to 5..95 Hz, then standardised per
  channel and subject (as in `eeg_5_95_std.pth`).
  - evoked: a sum of components, each a damped oscillation (Gaussian envelope at a latency of
    60..400 ms, 3..20 Hz) with a smooth scalp topography. A class evokes the components of its
    shape, its colour, its texture and its own; an image adds, with weight `image_weight`,
    components scaled by its drawing parameters (position, size, rotation, background brightness)
    and one of its own. Each subject has its own gain, topography distortion and latency shift;
    each trial jitters amplitude and latency.
  - background: spatially mixed sources with a 1/f power spectrum, an alpha (~10 Hz) rhythm over
    posterior channels and a little sensor noise, scaled to unit standard deviation per channel.
  `signal_strength` is the peak amplitude of a typical evoked component in units of the
  background's standard deviation: the SNR knob. At the writers' default 2.0, a logistic
  regression on one subject (20 classes, 16 training images each) reaches about 50% test accuracy
  (chance 5%); at 1.0 about 10-25%.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import torch
from PIL import Image

from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.core.files import atomic_path, atomic_torch_save, atomic_write_json

SFREQ = 1000.0  # Hz, as ImageNet-EEG
PASS_BAND = (5.0, 95.0)  # Hz, the band of eeg_5_95_std.pth

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 30),
    "purple": (148, 62, 189),
    "orange": (255, 127, 14),
    "cyan": (23, 190, 207),
    "pink": (240, 110, 180),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)


def keyed_rng(*key: object) -> np.random.Generator:
    """A generator seeded by a key of ints/strings (stable across runs and platforms)."""
    return np.random.default_rng([zlib.crc32(repr(key).encode())])


# ---------------------------------------------------------------------------------------------
# Stimuli


@dataclass(frozen=True)
class StimulusClass:
    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        """Readable class name: "red striped circle", or "red circle" for a plain one."""
        parts = [self.colour] + ([] if self.texture == "plain" else [self.texture]) + [self.shape]
        return " ".join(parts)


def stimulus_classes(n_classes: int) -> list[StimulusClass]:
    """`n_classes` distinct shape x colour x texture combinations, spread over all three attributes.

    Class k -> digits (a, b, t) = (k mod 8, k div 8 mod 8, k div 64): shape a, colour (a + b) mod 8,
    texture (b + t) mod 4 - a bijection, so classes are distinct and neighbouring classes differ
    in shape and colour.
    """
    if not 1 <= n_classes <= MAX_CLASSES:
        raise ConfigError(f"n_classes must be in 1..{MAX_CLASSES} (shape x colour x texture), got {n_classes}")
    colours = list(COLOURS)
    classes = []
    for k in range(n_classes):
        a, b, t = k % len(SHAPES), (k // len(SHAPES)) % len(colours), k // (len(SHAPES) * len(colours))
        classes.append(StimulusClass(SHAPES[a], colours[(a + b) % len(colours)],
                                     TEXTURES[(b + t) % len(TEXTURES)]))
    return classes


@dataclass(frozen=True)
class StimulusParams:
    """Per-image variation, in units of the image side."""

    cx: float  # centre, 0..1 from the left
    cy: float  # centre, 0..1 from the top
    radius: float  # circumradius of the shape
    rotation: float  # radians
    background: tuple[float, float, float]  # RGB 0..255
    gradient_angle: float  # direction of the background's brightness gradient
    gradient: float  # brightness change across the image, 0..255

    def features(self) -> np.ndarray:
        """[6] values of order 1 that the image-specific EEG components are scaled by."""
        brightness = (float(np.mean(self.background)) - 130.0) / 50.0
        return np.array([(self.cx - 0.5) / 0.12, (self.cy - 0.5) / 0.12, (self.radius - 0.31) / 0.06,
                         math.cos(self.rotation), math.sin(self.rotation), brightness])


def sample_stimulus_params(rng: np.random.Generator) -> StimulusParams:
    grey = rng.uniform(70, 190)
    tint = rng.normal(0, 18, size=3)
    return StimulusParams(
        cx=float(rng.uniform(0.38, 0.62)),
        cy=float(rng.uniform(0.38, 0.62)),
        radius=float(rng.uniform(0.22, 0.38)),
        rotation=float(rng.uniform(0, 2 * math.pi)),
        background=tuple(float(v) for v in np.clip(grey + tint, 0, 255)),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        gradient=float(rng.uniform(0, 60)),
    )


def _regular_polygon(r: np.ndarray, phi: np.ndarray, n: int, phi0: float) -> np.ndarray:
    """Inside a regular n-gon of circumradius 1 with a vertex at angle phi0."""
    sector = 2 * math.pi / n
    d = np.mod(phi - phi0 - sector / 2, sector) - sector / 2
    return r * np.cos(d) <= math.cos(math.pi / n)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return r <= 0.9
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":
        return _regular_polygon(r, phi, 3, -math.pi / 2)
    if shape == "hexagon":
        return _regular_polygon(r, phi, 6, 0.0)
    if shape == "star":
        sector = 2 * math.pi / 5
        tip = np.abs(np.mod(phi + math.pi / 2, sector) - sector / 2) / (sector / 2)  # 0 at tips
        return r <= 1.0 - 0.58 * tip
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    raise ConfigError(f"unknown shape '{shape}' (known: {', '.join(SHAPES)})")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """Where the texture's second colour goes (in the shape's own rotated frame)."""
    f = 2.5  # pattern periods per shape radius
    if texture == "plain":
        return None
    if texture == "striped":
        return np.sin(math.pi * f * u) > 0
    if texture == "dotted":
        return (np.mod(u * f, 1) - 0.5) ** 2 + (np.mod(v * f, 1) - 0.5) ** 2 < 0.3**2
    if texture == "checkered":
        return (np.floor(u * f) + np.floor(v * f)) % 2 == 0
    raise ConfigError(f"unknown texture '{texture}' (known: {', '.join(TEXTURES)})")


def draw_stimulus(
    stimulus: StimulusClass | Sequence[str],
    image_size: int = 64,
    params: StimulusParams | None = None,
    seed: int = 0,
) -> Image.Image:
    """A procedural stimulus image (RGB, image_size x image_size).

    stimulus: a `StimulusClass` or (shape, colour, texture). params: the per-image variation; by
    default drawn from `seed`. Drawn at 2x and box-filtered down for smooth edges.
    """
    if not isinstance(stimulus, StimulusClass):
        stimulus = StimulusClass(*stimulus)
    if stimulus.colour not in COLOURS:
        raise ConfigError(f"unknown colour '{stimulus.colour}' (known: {', '.join(COLOURS)})")
    if params is None:
        params = sample_stimulus_params(np.random.default_rng(seed))
    supersample = 2 if image_size <= 256 else 1
    n = image_size * supersample
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n
    dx, dy = (x - params.cx) / params.radius, (y - params.cy) / params.radius
    cos, sin = math.cos(params.rotation), math.sin(params.rotation)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy

    ramp = (x - 0.5) * math.cos(params.gradient_angle) + (y - 0.5) * math.sin(params.gradient_angle)
    canvas = np.asarray(params.background, dtype=np.float32) + (params.gradient * ramp)[..., None]
    colour = np.asarray(COLOURS[stimulus.colour], dtype=np.float32)
    inside = _shape_mask(stimulus.shape, u, v)
    canvas[inside] = colour
    second = _texture_mask(stimulus.texture, u, v)
    if second is not None:
        canvas[inside & second] = colour * 0.35
    img = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8), mode="RGB")
    if supersample > 1:
        img = img.resize((image_size, image_size), resample=Image.BOX)
    return img


# ---------------------------------------------------------------------------------------------
# EEG


def channel_layout(n_channels: int) -> np.ndarray:
    """[n_channels, 2] electrode positions in the unit disk (azimuthal projection of a Fibonacci
    spiral over the upper hemisphere; +y = front, -y = back of the head)."""
    i = np.arange(n_channels) + 0.5
    polar = np.arccos(1 - i / n_channels)  # 0 at the vertex .. pi/2 at the rim
    azimuth = i * math.pi * (3 - math.sqrt(5))
    radius = polar / (math.pi / 2)
    return np.stack([radius * np.cos(azimuth), radius * np.sin(azimuth)], axis=1)


@dataclass(frozen=True)
class _Component:
    centre: np.ndarray  # [2] topography centre
    sink: np.ndarray  # [2] centre of the opposite-sign lobe (a dipole-like map)
    spread: float  # topography width
    latency: float  # ms
    width: float  # ms, envelope standard deviation
    freq: float  # Hz
    phase: float
    amplitude: float


@dataclass(frozen=True)
class _Subject:
    gain: float
    shift: np.ndarray  # [2] topography displacement
    distortion: np.ndarray  # [C] multiplicative topography jitter
    latency_shift: float  # ms
    mixing: np.ndarray  # [C, n_sources] background source topographies
    alpha_topography: np.ndarray  # [C]
    alpha_freq: float


def _blob(layout: np.ndarray, centre: np.ndarray, spread: float) -> np.ndarray:
    return np.exp(-np.sum((layout - centre) ** 2, axis=1) / (2 * spread**2))


class SyntheticEEG:
    """Class- and image-dependent evoked responses in 1/f noise with an alpha rhythm.

    Evoked activity is addressed by keys: `parts = [(key, weight), ...]`, e.g.
    `[(("shape", "circle"), 1.0), (("image", 17), 0.5)]`; each key owns
    `components_per_key` components drawn deterministically from (seed, key). Subjects (ints) get
    deterministic gains, topography distortions and latency shifts.
    """

    def __init__(
        self,
        n_channels: int = 128,
        sfreq: float = SFREQ,
        signal_strength: float = 1.0,
        seed: int = 0,
        components_per_key: int = 2,
        n_sources: int = 24,
        noise_exponent: float = 1.0,
        alpha_power: float = 0.5,
        sensor_noise: float = 0.3,
        pass_band: tuple[float, float] = PASS_BAND,
        subject_variability: float = 1.0,
    ):
        self.n_channels, self.sfreq, self.seed = n_channels, sfreq, seed
        self.signal_strength = signal_strength
        self.components_per_key, self.n_sources = components_per_key, n_sources
        self.noise_exponent, self.alpha_power, self.sensor_noise = noise_exponent, alpha_power, sensor_noise
        self.pass_band, self.subject_variability = pass_band, subject_variability
        self.layout = channel_layout(n_channels)
        self._components: dict[object, list[_Component]] = {}
        self._subjects: dict[int, _Subject] = {}
        self._topographies: dict[tuple[object, int], list[np.ndarray]] = {}

    def components(self, key: object) -> list[_Component]:
        if key not in self._components:
            rng = keyed_rng("component", self.seed, key)
            comps = []
            for _ in range(self.components_per_key):
                centre = rng.uniform(-0.8, 0.8, size=2)
                comps.append(_Component(
                    centre=centre,
                    sink=centre + rng.normal(0, 0.5, size=2),
                    spread=float(rng.uniform(0.25, 0.5)),
                    latency=float(rng.uniform(60, 400)),
                    width=float(rng.uniform(15, 50)),
                    freq=float(rng.uniform(3, 20)),
                    phase=float(rng.uniform(0, 2 * math.pi)),
                    amplitude=float(rng.uniform(0.6, 1.0) * rng.choice([-1, 1])),
                ))
            self._components[key] = comps
        return self._components[key]

    def topographies(self, key: object, subject: int) -> list[np.ndarray]:
        """[C] scalp map of each component of `key`, as seen in `subject` (shifted and distorted)."""
        if (key, subject) not in self._topographies:
            subj = self.subject(subject)
            self._topographies[(key, subject)] = [
                (_blob(self.layout, c.centre + subj.shift, c.spread)
                 - 0.5 * _blob(self.layout, c.sink + subj.shift, c.spread)) * subj.distortion
                for c in self.components(key)]
        return self._topographies[(key, subject)]

    def subject(self, subject: int) -> _Subject:
        if subject not in self._subjects:
            rng = keyed_rng("subject", self.seed, self.n_channels, subject)
            var = self.subject_variability
            field = sum(rng.normal() * _blob(self.layout, rng.uniform(-1, 1, size=2), 0.5) for _ in range(4))
            mixing = np.stack([rng.choice([-1, 1]) * _blob(self.layout, rng.uniform(-1, 1, size=2),
                                                           rng.uniform(0.2, 0.6))
                               for _ in range(self.n_sources)], axis=1)
            self._subjects[subject] = _Subject(
                gain=float(np.exp(var * rng.normal(0, 0.2))),
                shift=var * rng.normal(0, 0.04, size=2),
                distortion=1.0 + var * 0.2 * field,
                latency_shift=float(var * rng.normal(0, 4)),
                mixing=mixing,
                alpha_topography=_blob(self.layout, np.array([0.0, -0.7]), 0.45),
                alpha_freq=float(rng.uniform(9.0, 11.5)),
            )
        return self._subjects[subject]

    def band_pass(self, x: np.ndarray) -> np.ndarray:
        """Zero every frequency outside the pass band (along the last axis)."""
        n = x.shape[-1]
        spectrum = scipy.fft.rfft(x, axis=-1)
        freqs = np.fft.rfftfreq(n, 1.0 / self.sfreq)
        spectrum[..., (freqs < self.pass_band[0]) | (freqs > self.pass_band[1])] = 0
        return scipy.fft.irfft(spectrum, n=n, axis=-1)

    def evoked(
        self,
        parts: Iterable[tuple[object, float]],
        n_times: int,
        subject: int,
        rng: np.random.Generator,
        onset: float = 0.0,
    ) -> np.ndarray:
        """[C, n_times] evoked response to a stimulus at `onset` ms, band-passed like the noise."""
        subj = self.subject(subject)
        t = np.arange(n_times) * (1000.0 / self.sfreq)
        jitter = rng.normal(0, 8.0)  # ms, shared by the trial's components
        gain = subj.gain * rng.uniform(0.8, 1.2)
        topographies, waves = [], []
        for key, weight in parts:
            if weight == 0:
                continue
            topographies += self.topographies(key, subject)
            for c in self.components(key):
                lag = t - (onset + c.latency + subj.latency_shift + jitter)
                waves.append(weight * c.amplitude * np.exp(-0.5 * (lag / c.width) ** 2)
                             * np.cos(2 * math.pi * c.freq * lag / 1000.0 + c.phase))
        if not waves:
            return np.zeros((self.n_channels, n_times))
        # Band-pass the few component waveforms rather than every channel (the mixing is linear).
        return gain * (np.stack(topographies, axis=1) @ self.band_pass(np.stack(waves)))

    def background(self, n_times: int, subject: int, rng: np.random.Generator) -> np.ndarray:
        """[C, n_times] 1/f + alpha + sensor noise, band-passed, unit std per channel."""
        subj = self.subject(subject)
        n_freqs = n_times // 2 + 1
        freqs = np.fft.rfftfreq(n_times, 1.0 / self.sfreq)
        in_band = (freqs >= self.pass_band[0]) & (freqs <= self.pass_band[1])
        pink = np.where(in_band, np.maximum(freqs, 1.0) ** (-self.noise_exponent / 2), 0.0)
        alpha = np.where(in_band, np.exp(-0.5 * ((freqs - subj.alpha_freq) / 1.0) ** 2), 0.0)

        def coloured(n: int, amplitude: np.ndarray) -> np.ndarray:
            """n unit-variance series with the given amplitude spectrum (random phases)."""
            white = rng.normal(size=(n, n_freqs)) + 1j * rng.normal(size=(n, n_freqs))
            x = scipy.fft.irfft(white * amplitude, n=n_times, axis=-1)
            return x / (x.std(axis=-1, keepdims=True) + 1e-12)

        sources = coloured(self.n_sources, pink)
        x = subj.mixing @ sources
        x = x / (x.std(axis=-1, keepdims=True) + 1e-12)
        x = x + math.sqrt(self.alpha_power) * subj.alpha_topography[:, None] * coloured(1, alpha)
        x = x + self.sensor_noise * coloured(self.n_channels, in_band.astype(float))
        return x / (x.std(axis=-1, keepdims=True) + 1e-12)

    def trial(
        self,
        parts: Iterable[tuple[object, float]],
        n_times: int,
        subject: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """[C, n_times] float64: background + signal_strength * evoked.

        The background is drawn first, so with signal_strength 0 the trial equals
        `background(n_times, subject, rng)` for the same generator state.
        """
        x = self.background(n_times, subject, rng)
        if self.signal_strength == 0:
            return x
        return x + self.signal_strength * self.evoked(parts, n_times, subject, rng)


def stimulus_parts(stimulus: StimulusClass, class_index: int, image_id: int, params: StimulusParams,
                   image_weight: float) -> list[tuple[object, float]]:
    """The evoked-response keys of one image: its class's attributes, then the image's own."""
    parts: list[tuple[object, float]] = [
        (("shape", stimulus.shape), 1.0),
        (("colour", stimulus.colour), 1.0),
        (("texture", stimulus.texture), 0.7),
        (("class", class_index), 1.0),
    ]
    parts += [(("feature", f), image_weight * float(value)) for f, value in enumerate(params.features())]
    parts.append((("image", image_id), image_weight))
    return parts


def visual_parts(rng: np.random.Generator, image_weight: float) -> list[tuple[object, float]]:
    """The evoked-response keys of an unlabelled stimulus of a visual paradigm: a shape, a colour and a
    texture drawn independently (any combination, a class of the paired data or not) and random drawing
    parameters, with the weights `stimulus_parts` gives them; no class and no image component."""
    shape, colour, texture = (str(rng.choice(values)) for values in (SHAPES, list(COLOURS), TEXTURES))
    parts: list[tuple[object, float]] = [(("shape", shape), 1.0), (("colour", colour), 1.0), (("texture", texture), 0.7)]
    features = sample_stimulus_params(rng).features()
    return parts + [(("feature", f), image_weight * float(value)) for f, value in enumerate(features)]


# ---------------------------------------------------------------------------------------------
# Files in the real formats


def _trial_lengths(rng: np.random.Generator, n: int, length_range: tuple[int, int],
                   out_of_range_fraction: float) -> np.ndarray:
    """Mostly uniform in [lo, hi]; a fraction 1..50 samples below lo or above hi."""
    lo, hi = length_range
    lengths = rng.integers(lo, hi + 1, size=n)
    outside = rng.random(n) < out_of_range_fraction
    below = rng.random(n) < 0.5
    offsets = rng.integers(1, 51, size=n)
    lengths = np.where(outside & below, lo - offsets, lengths)
    return np.where(outside & ~below, hi + offsets, lengths)


def _split_images(rng: np.random.Generator, images_by_class: list[list[int]],
                  fractions: tuple[float, float, float]) -> dict[str, set[int]]:
    """Assign every image to train/val/test, class by class (so each split holds every class)."""
    out: dict[str, set[int]] = {"train": set(), "val": set(), "test": set()}
    for images in images_by_class:
        order = list(rng.permutation(images))
        n = len(order)
        n_val = max(1, round(fractions[1] * n)) if n >= 3 else 0
        n_test = max(1, round(fractions[2] * n)) if n >= 3 else 0
        n_train = n - n_val - n_test
        out["train"].update(int(i) for i in order[:n_train])
        out["val"].update(int(i) for i in order[n_train:n_train + n_val])
        out["test"].update(int(i) for i in order[n_train + n_val:])
    return out


def write_synthetic_imagenet_eeg(
    out_dir: str | os.PathLike,
    n_classes: int = 40,
    images_per_class: int = 10,
    n_subjects: int = 6,
    n_channels: int = 128,
    image_size: int = 64,
    seed: int = 0,
    signal_strength: float = 2.0,
    image_weight: float = 0.5,
    trial_length_range: tuple[int, int] = (450, 600),
    out_of_range_fraction: float = 0.05,
    n_splits: int = 1,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    dropped_final_trials: int = 0,
    jpeg_quality: int = 90,
    split_unit: str = "image",
) -> dict[str, Path]:
    """Write a synthetic ImageNet-EEG in the real formats below `out_dir`.

    Files: `eeg_5_95_std.pth`, `block_splits_by_image_single.pth`, `block_splits_by_image_all.pth`,
    `images/<wnid>/<wnid>_<n>.JPEG`, `class_names.json` ({wnid: "red striped circle"}).
    Every subject sees every image once, in a block design (one block per class; the same block
    and image order for every subject). Trial lengths are uniform in `trial_length_range` except
    a fraction `out_of_range_fraction`, 1..50 samples outside it (exercising the length filter).
    The last subject misses its final `dropped_final_trials` trials (the real file holds 11965 of
    12000), so some positions of the "single" split file point past that subject's list.
    Splits are by image (`split_unit="image"`, as the real files): all trials of an image fall in one
    split. `split_unit="trial"` splits the "all" file by trial instead, so the trials of one image by
    different subjects fall in different splits - a split with repeated stimuli, for the split-hygiene
    check (data/split_hygiene.py); the "single" file is the same either way, since a subject sees each
    image once. The "single" file holds positions in one subject's trial list, the "all" file
    positions in the whole list; each split's indices are in shuffled order, like the real files.

    Returns {"root", "eeg_path", "splits_path" (the single file), "splits_all_path", "image_dir",
    "class_names_path"}.
    """
    if n_subjects < 1 or images_per_class < 1:
        raise ConfigError(f"need n_subjects >= 1 and images_per_class >= 1, got {n_subjects}, {images_per_class}")
    if split_unit not in ("image", "trial"):
        raise ConfigError(f"split_unit must be 'image' or 'trial', got {split_unit!r}")
    out = Path(out_dir)
    classes = stimulus_classes(n_classes)
    wnids = [f"n9{k:07d}" for k in range(n_classes)]  # WordNet-id format, outside the real id range
    names, labels, params = _write_stimuli(out / "images", classes, wnids, images_per_class, image_size, seed,
                                           jpeg_quality)
    images_by_class, session = _block_session(n_classes, images_per_class, seed)
    generator = SyntheticEEG(n_channels=n_channels, signal_strength=signal_strength, seed=seed)
    dataset = []
    for subject in range(1, n_subjects + 1):
        trial_images = session[:len(session) - dropped_final_trials] if subject == n_subjects else session
        dataset += _subject_trials(generator, subject, trial_images, classes, labels, params, image_weight,
                                   keyed_rng("trials", seed, subject), trial_length_range, out_of_range_fraction)
    splits_single, splits_all = _split_positions(session, dataset, images_by_class, n_splits, split_fractions, seed,
                                                 split_unit)
    paths = {
        "root": out,
        "eeg_path": out / "eeg_5_95_std.pth",
        "splits_path": out / "block_splits_by_image_single.pth",
        "splits_all_path": out / "block_splits_by_image_all.pth",
        "image_dir": out / "images",
        "class_names_path": out / "class_names.json",
    }
    atomic_torch_save({"dataset": dataset, "labels": wnids, "images": names}, paths["eeg_path"])
    atomic_torch_save({"splits": splits_single}, paths["splits_path"])
    atomic_torch_save({"splits": splits_all}, paths["splits_all_path"])
    atomic_write_json(paths["class_names_path"], {w: c.name for w, c in zip(wnids, classes)})
    return paths


def _write_stimuli(image_dir: Path, classes: Sequence[StimulusClass], wnids: Sequence[str], images_per_class: int,
                   image_size: int, seed: int, jpeg_quality: int) -> tuple[list[str], list[int], list[StimulusParams]]:
    """`images/<wnid>/<wnid>_<n>.JPEG` for every class; (image names, class of each, drawing parameters)."""
    names, labels, params = [], [], []
    for k, wnid in enumerate(wnids):
        for j in range(images_per_class):
            image_params = sample_stimulus_params(keyed_rng("image", seed, len(names)))
            path = image_dir / wnid / f"{wnid}_{j + 1}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                draw_stimulus(classes[k], image_size, image_params).save(tmp, format="JPEG", quality=jpeg_quality)
            names.append(f"{wnid}_{j + 1}")
            labels.append(k)
            params.append(image_params)
    return names, labels, params


def _block_session(n_classes: int, images_per_class: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """(image ids per class, the session's image order): classes in a random block order, images
    shuffled within their block - the block design of ImageNet-EEG."""
    order_rng = keyed_rng("order", seed)
    images_by_class = [[k * images_per_class + j for j in range(images_per_class)] for k in range(n_classes)]
    session = [int(i) for k in order_rng.permutation(n_classes) for i in order_rng.permutation(images_by_class[k])]
    return images_by_class, session


def _subject_trials(generator: SyntheticEEG, subject: int, trial_images: Sequence[int],
                    classes: Sequence[StimulusClass], labels: Sequence[int], params: Sequence[StimulusParams],
                    image_weight: float, rng: np.random.Generator, length_range: tuple[int, int],
                    out_of_range_fraction: float) -> list[dict]:
    """One subject's trials in the file's format, each channel standardised over all of the
    subject's samples (as `eeg_5_95_std.pth` is)."""
    lengths = _trial_lengths(rng, len(trial_images), length_range, out_of_range_fraction)
    trials = []
    for image_id, n_times in zip(trial_images, lengths):
        k = labels[image_id]
        parts = stimulus_parts(classes[k], k, image_id, params[image_id], image_weight)
        trials.append(generator.trial(parts, int(n_times), subject, rng))
    stacked = np.concatenate(trials, axis=1)
    mean, std = stacked.mean(axis=1, keepdims=True), stacked.std(axis=1, keepdims=True) + 1e-12
    return [{"eeg": torch.from_numpy(((eeg - mean) / std).astype(np.float32)), "image": image_id,
             "label": labels[image_id], "subject": subject} for image_id, eeg in zip(trial_images, trials)]


def _split_positions(session: Sequence[int], dataset: Sequence[dict], images_by_class: list[list[int]],
                     n_splits: int, fractions: tuple[float, float, float], seed: int,
                     unit: str = "image") -> tuple[list, list]:
    """The "single" splits (positions in one subject's trial list) and the "all" splits (positions
    in the whole list), by image (or, for the "all" file, by trial), each split's indices in shuffled
    order like the real files."""
    splits_single, splits_all = [], []
    for n in range(n_splits):
        rng = keyed_rng("splits", seed, n)
        assignment = _split_images(rng, images_by_class, fractions)
        single, every = {}, {}
        for name, images in assignment.items():
            single[name] = [int(p) for p in rng.permutation([p for p, i in enumerate(session) if i in images])]
            every[name] = [int(p) for p in rng.permutation([p for p, t in enumerate(dataset) if t["image"] in images])]
        if unit == "trial":  # its own generator: the by-image files stay as they were
            trial_rng = keyed_rng("trial splits", seed, n)
            by_class = [[p for p, t in enumerate(dataset) if t["image"] in set(images)] for images in images_by_class]
            every = {name: [int(p) for p in trial_rng.permutation(sorted(positions))]
                     for name, positions in _split_images(trial_rng, by_class, fractions).items()}
        splits_single.append(single)
        splits_all.append(every)
    return splits_single, splits_all


def write_synthetic_pretrain_corpus(
    out_dir: str | os.PathLike,
    n_files: int,
    channel_counts: Sequence[int] = (32, 64, 128),
    length_range: tuple[int, int] = (400, 2000),
    n_subjects: int = 8,
    n_event_types: int = 8,
    event_interval: float = 500.0,
    signal_strength: float = 2.0,
    amplitude: float = 10.0,
    seed: int = 0,
    visual_share: float = 0.0,
    image_weight: float = 0.5,
) -> list[Path]:
    """Write `n_files` unpaired recordings `sub-XX/rec-NNNN.npy` (float32, channels x time) at 1 kHz.

    Each file: a random channel count from `channel_counts` and length in `length_range`; the
    same noise model as the paired data plus evoked responses to a random event type every
    `event_interval` ms (so masked modelling has structure to learn); scaled to standard deviation
    `amplitude` (10, so the authors' `scale` 0.1 brings it back to about 1).

    `visual_share`: the share of the files (round(visual_share * n_files), chosen with `seed`) that
    record a visual paradigm instead, as MOABB's ERP/SSVEP datasets do: each event is then the
    response to a random stimulus (`visual_parts`: a shape, a colour and a texture drawn
    independently, and random drawing parameters) - the components the paired stimuli evoke, in
    combinations that need not be a class, with no label. 0 writes exactly the files it always did.
    """
    if not 0.0 <= visual_share <= 1.0:
        raise ConfigError(f"visual_share must be in [0, 1] (a share of the corpus's files), got {visual_share}")
    out = Path(out_dir)
    generators = {c: SyntheticEEG(n_channels=c, signal_strength=signal_strength, seed=seed) for c in channel_counts}
    # A permutation of its own, so the other files draw exactly what they drew before the knob existed.
    visual = {int(i) for i in keyed_rng("visual files", seed).permutation(n_files)[:round(visual_share * n_files)]}
    paths = []
    for i in range(n_files):
        rng = keyed_rng("pretrain", seed, i)
        n_chans = int(rng.choice(channel_counts))
        n_times = int(rng.integers(length_range[0], length_range[1] + 1))
        subject = 1 + i % n_subjects
        generator = generators[n_chans]
        eeg = generator.background(n_times, subject, rng)
        if signal_strength != 0:
            # Events from half an interval before the start, so the first response may be cut.
            onsets = rng.uniform(-event_interval, 0) + event_interval * np.arange(n_times // event_interval + 2)
            eeg = eeg + signal_strength * sum(
                generator.evoked(visual_parts(rng, image_weight) if i in visual
                                 else [(("event", int(rng.integers(n_event_types))), 1.0)], n_times, subject, rng, onset)
                for onset in onsets)
        path = out / f"sub-{subject:02d}" / f"rec-{i:04d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, (amplitude * eeg).astype(np.float32))
        paths.append(path)
    return paths

