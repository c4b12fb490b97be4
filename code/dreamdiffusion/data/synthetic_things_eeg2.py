"""A synthetic THINGS-EEG2 in the real layouts (official 17 x 100 `np.save`, NICE 63 x 250 pickle):
training and test concepts that share attributes in other combinations, their images, and EEG with
an evoked response to each attribute - what `make demo-things` and the tests load as if it were real."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.core.files import atomic_path
from dreamdiffusion.data.synthetic import (
    MAX_CLASSES,
    StimulusClass,
    SyntheticEEG,
    draw_stimulus,
    keyed_rng,
    sample_stimulus_params,
    stimulus_classes,
    stimulus_parts,
)
from dreamdiffusion.data.things_eeg2 import (
    EEG_FILES,
    IMAGE_FOLDERS,
    LAYOUTS,
    METADATA_FILE,
    METADATA_PREFIX,
    PARTITIONS,
    subject_folder,
)

# ---------------------------------------------------------------------------------------------
# Synthetic THINGS-EEG2 in the real layouts


def synthetic_concepts(n_train: int, n_test: int, seed: int) -> tuple[list[StimulusClass], list[StimulusClass]]:
    """Training and test concepts: distinct shape x colour x texture combinations, drawn with `seed`.

    Every attribute of a test concept also occurs among the training concepts, in other
    combinations - so a map from EEG to attributes learnt on training concepts can, in principle,
    name the unseen test concepts (the zero-shot setting of THINGS-EEG2).
    """
    if n_train < 1 or n_test < 1 or n_train + n_test > MAX_CLASSES:
        raise ConfigError(f"need n_train_concepts >= 1, n_test_concepts >= 1 and at most {MAX_CLASSES} "
                          f"concepts in all, got {n_train} + {n_test}")
    every = stimulus_classes(MAX_CLASSES)
    pool = [every[int(i)] for i in keyed_rng("things-eeg2 concepts", seed).permutation(MAX_CLASSES)]
    train = pool[:n_train]
    seen = [{getattr(c, a) for c in train} for a in ("shape", "colour", "texture")]
    test = [c for c in pool[n_train:] if c.shape in seen[0] and c.colour in seen[1] and c.texture in seen[2]]
    if len(test) < n_test:
        raise ConfigError(f"only {len(test)} unseen combinations share their attributes with the {n_train} "
                          "training concepts; ask for fewer test concepts or more training concepts")
    return train, test[:n_test]


def _write_npy(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, obj)  # a file handle, so np.save does not append ".npy" to the temporary name


def _write_image_set(image_dir: Path, concepts: dict[str, list[StimulusClass]], images_per_concept: int,
                     image_size: int, seed: int, jpeg_quality: int) -> dict[str, list[tuple]]:
    """JPEG stimuli, `image_metadata.npy` and `concept_attributes.json`.

    Returns per partition, one (stimulus, class index, image id, params) per EEG row, in metadata order.
    A test concept that is also a training concept shows that concept's first training image again
    (same file name, drawing and image-specific response): a repeated stimulus.
    """
    metadata, attributes, rows = {}, {}, {}
    class_index = image_id = 0
    first_image: dict[StimulusClass, tuple[int, Any]] = {}  # training concept -> (image id, params) of its image 1
    for partition, classes in concepts.items():
        prefix, per_concept = METADATA_PREFIX[partition], images_per_concept if partition == "training" else 1
        names, files, things, rows[partition], attributes[partition] = [], [], [], [], {}
        for k, stimulus in enumerate(classes):
            slug = stimulus.name.replace(" ", "_")
            concept = f"{k + 1:05d}_{slug}"
            attributes[partition][concept] = {"shape": stimulus.shape, "colour": stimulus.colour,
                                              "texture": stimulus.texture}
            for j in range(per_concept):
                repeated = first_image.get(stimulus) if partition == "test" else None
                this_id, params = repeated or (image_id, sample_stimulus_params(keyed_rng("things-eeg2 image", seed,
                                                                                          image_id)))
                if partition == "training" and j == 0:
                    first_image[stimulus] = (this_id, params)
                file = f"{slug}_{j + 1:02d}{'b' if j == 0 else 's'}.jpg"
                path = image_dir / IMAGE_FOLDERS[partition] / concept / file
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    draw_stimulus(stimulus, image_size, params).save(tmp, format="JPEG", quality=jpeg_quality)
                names.append(concept)
                files.append(file)
                things.append(f"{class_index + 1:04d}_{slug}")
                rows[partition].append((stimulus, class_index, this_id, params))
                if repeated is None:
                    image_id += 1
            class_index += 1
        metadata |= {f"{prefix}_img_concepts": names, f"{prefix}_img_files": files,
                     f"{prefix}_img_concepts_THINGS": things}
    _write_npy(image_dir / METADATA_FILE, metadata)
    with atomic_path(image_dir / "concept_attributes.json") as tmp:
        tmp.write_text(json.dumps(attributes, indent=2) + "\n")
    return rows


def _synthetic_epochs(generator: SyntheticEEG, rows: list[tuple], n_reps: int, n_times: int, subject: int,
                      onset_ms: float, image_weight: float, rng: np.random.Generator) -> np.ndarray:
    """[len(rows), n_reps, C, n_times] float64: each repetition a fresh trial of the same image."""
    out = np.empty((len(rows), n_reps, generator.n_channels, n_times))
    for i, (stimulus, class_index, image_id, params) in enumerate(rows):
        parts = stimulus_parts(stimulus, class_index, image_id, params, image_weight)
        for r in range(n_reps):
            evoked = generator.evoked(parts, n_times, subject, rng, onset=onset_ms)
            out[i, r] = generator.background(n_times, subject, rng) + generator.signal_strength * evoked
    return out


def write_synthetic_things_eeg2(
    out_dir: str | os.PathLike,
    n_train_concepts: int = 16,
    images_per_concept: int = 4,
    n_train_reps: int = 4,
    n_test_concepts: int = 8,
    n_test_reps: int = 20,
    n_channels: int | None = None,
    n_times: int | None = None,
    sfreq: float | None = None,
    layout: str = "official",
    n_subjects: int = 1,
    image_size: int = 32,
    seed: int = 0,
    signal_strength: float = 2.0,
    image_weight: float = 0.5,
    jpeg_quality: int = 90,
    repeated_test_concepts: int = 0,
) -> dict[str, Any]:
    """Write a synthetic THINGS-EEG2 below `out_dir` in a real layout ("official" or "nice").

    Files: `preprocessed_eeg/sub-XX/preprocessed_eeg_{training,test}.npy` and `image_set/` with
    `image_metadata.npy`, `training_images/<concept>/<file>.jpg` (`images_per_concept` each),
    `test_images/<concept>/<file>.jpg` (one each, as the real set) and `concept_attributes.json`
    ({partition: {concept: {"shape", "colour", "texture"}}}). n_channels, n_times and sfreq default to
    the layout's (17 x 100 at 100 Hz; 63 x 250 at 250 Hz). A concept is a shape x colour x texture
    combination (`synthetic_concepts`); the EEG of an image is `synthetic.SyntheticEEG`'s response to
    its attributes, its concept and its own drawing, evoked at stimulus onset (t = 0 of `times`),
    standardised per channel and subject. Deterministic for a seed. `repeated_test_concepts` = k makes the
    first k test concepts training concepts shown with their first training image (a split with repeated
    stimuli, for the split-hygiene check; the real test concepts never occur in training).

    Returns {"root", "eeg_dir", "image_dir", "metadata_path", "attributes_path"}.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {list(LAYOUTS)}, got '{layout}'")
    if min(images_per_concept, n_train_reps, n_test_reps, n_subjects) < 1:
        raise ConfigError("images_per_concept, n_train_reps, n_test_reps and n_subjects must be >= 1")
    spec = LAYOUTS[layout]
    n_channels, n_times, sfreq = n_channels or len(spec.ch_names), n_times or spec.n_times, sfreq or spec.sfreq
    ch_names = list(spec.ch_names)
    if n_channels != len(ch_names):
        ch_names = [f"E{c + 1:03d}" for c in range(n_channels)]
    n_before = round((spec.tmin - spec.times_start) * sfreq)  # un-cropped samples that `times` keeps
    times = spec.times_start + np.arange(n_before + n_times) / sfreq
    out = Path(out_dir)
    paths = {"root": out, "eeg_dir": out / "preprocessed_eeg", "image_dir": out / "image_set"}
    train, test = synthetic_concepts(n_train_concepts, n_test_concepts, seed)
    if not 0 <= repeated_test_concepts <= min(n_train_concepts, n_test_concepts):
        raise ConfigError(f"repeated_test_concepts must be in 0..{min(n_train_concepts, n_test_concepts)}, "
                          f"got {repeated_test_concepts}")
    test = train[:repeated_test_concepts] + test[:n_test_concepts - repeated_test_concepts]
    rows = _write_image_set(paths["image_dir"], {"training": train, "test": test}, images_per_concept,
                            image_size, seed, jpeg_quality)
    generator = SyntheticEEG(n_channels=n_channels, sfreq=sfreq, signal_strength=signal_strength, seed=seed,
                             pass_band=(1.0, min(95.0, 0.45 * sfreq)))
    for subject in range(1, n_subjects + 1):
        rng = keyed_rng("things-eeg2 trials", seed, subject)
        epochs = {p: _synthetic_epochs(generator, rows[p], n_train_reps if p == "training" else n_test_reps,
                                       n_times, subject, -1000.0 * spec.tmin, image_weight, rng)
                  for p in PARTITIONS}
        # Standardise each channel over all of the subject's samples (the real data are noise-normalised).
        stacked = np.concatenate([e.transpose(2, 0, 1, 3).reshape(n_channels, -1) for e in epochs.values()],
                                 axis=1)
        mean, std = stacked.mean(axis=1)[:, None], stacked.std(axis=1)[:, None] + 1e-12
        for partition, data in epochs.items():
            content = {"preprocessed_eeg_data": (data - mean) / std, "ch_names": ch_names, "times": times}
            path = paths["eeg_dir"] / subject_folder(subject) / EEG_FILES[partition]
            path.parent.mkdir(parents=True, exist_ok=True)
            if spec.writer == "np.save":
                _write_npy(path, content)
            else:
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    pickle.dump(content, f, protocol=4)
    return paths | {"metadata_path": paths["image_dir"] / METADATA_FILE,
                    "attributes_path": paths["image_dir"] / "concept_attributes.json"}


