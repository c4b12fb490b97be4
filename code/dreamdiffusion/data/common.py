"""What the paired datasets share: CLIP's normalisation, file and dict-file checks, the image helpers
(open as RGB or raise, [-1, 1] tensors, the train-time crop) and linear resampling along time."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from dreamdiffusion.core.errors import CheckpointError, DataError
from dreamdiffusion.core.files import safe_torch_load
from dreamdiffusion.models.clip_embedder import ProcessorTransform

# OpenAI CLIP's normalisation (the statistics CLIP ViT-L/14 was trained with); the demo's tiny CLIP
# is trained with them too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


DATA_README = "datasets/README.md"


def config_arguments(cfg: Any, target: Callable, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The fields of an OmegaConf config group that `target` takes as keyword arguments of the same
    name, less `skip`: the datasets name their arguments as `PairedDataConfig` names its fields, so a
    `from_config` passes the group on instead of copying each field out by hand."""
    return {name: cfg[name] for name in inspect.signature(target).parameters if name in cfg and name not in skip}


# The amplitude rule (datasets/README.md, "The amplitude rule"): the largest |value| of a recording (or
# of a trial's window) must lie in this range. EEG in microvolts peaks at tens to a few thousand, z-scored
# or whitened EEG at a few units. Above 1e6 (a volt, in microvolts; a million standard deviations) it is
# not EEG, and its squares overflow float32 in the losses; below 1e-3 it is EEG in volts (or flat), while
# the models are trained on microvolts or z-scores.
EEG_PEAK_RANGE = (1e-3, 1e6)


def eeg_scale_problem(peak: float) -> str | None:
    """Why EEG whose largest |value| is `peak` has an implausible scale (the amplitude rule), or None."""
    low, high = EEG_PEAK_RANGE
    if peak > high:
        return (f"has values up to {peak:.3g}, implausible for EEG in microvolts or z-scores (the amplitude rule "
                f"allows at most {high:g}: {DATA_README}); was it scaled or converted twice?")
    if peak < low:
        what = "is flat (every value is 0)" if peak == 0 else f"has values of at most {peak:.3g}"
        return (f"{what}: implausible for EEG in microvolts or z-scores (the amplitude rule asks for a peak of at "
                f"least {low:g}: {DATA_README}); EEG in volts must be multiplied by 1e6")
    return None


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path} ({DATA_README} explains where to get it)")
    return path


def load_torch_file(path: str | os.PathLike, what: str) -> Any:
    """A user-downloaded .pth, read without running pickled code (weights_only first)."""
    path = require_file(path, what)
    try:
        return safe_torch_load(path, what)
    except CheckpointError as err:
        raise DataError(str(err)) from err


def as_index(value: Any, what: str) -> int:
    """An integer field of a data file (a Python int, a numpy integer or a 0-d integer tensor), or a
    DataError naming `what`: a float, a string or a bool is not silently converted."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    shown = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}, {value.dtype}"
    raise DataError(f"{what} is {shown} ({type(value).__name__}), expected an integer")


def string_list(value: Any, key: str, path: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f"EEG file {path}: '{key}' must be a list of strings, got {type(value).__name__}"
                        + (f" holding {type(next(v for v in value if not isinstance(v, str))).__name__}"
                           if isinstance(value, (list, tuple)) else ""))
    return list(value)


def check_dict_file(loaded: Any, keys: Sequence[str], path: Any, what: str = "EEG file") -> None:
    """A data file that must hold a dict with `keys`: a DataError naming the file and the key otherwise."""
    if not isinstance(loaded, dict):
        raise DataError(f"{what} {path} holds a {type(loaded).__name__}, expected a dict with keys {list(keys)}")
    for key in keys:
        if key not in loaded:
            raise DataError(f"{what} {path} has no key '{key}' (keys present: {sorted(map(str, loaded))}; "
                            f"expected {list(keys)})")


def check_split_images(paths: Sequence[Path], split: str, image_dir: Any, where: str, decode: bool = True) -> None:
    """The images of a split: a DataError for any that is missing (how many, the first ten, `where`
    they go) or, with `decode`, that cannot be decoded."""
    paths = list(dict.fromkeys(paths))
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = "\n  ".join(map(str, missing[:10]))
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{len(missing)} image(s) of split '{split}' not found under {image_dir} ({where}):\n  "
                        f"{shown}{more}")
    broken = unreadable_images(paths) if decode else []
    if broken:
        path, why = broken[0]
        raise DataError(f"{len(broken)} image(s) of split '{split}' cannot be decoded, e.g. {path}: {why}")


def resample_linear(x: torch.Tensor, n_times: int) -> torch.Tensor:
    """`x [..., L]` -> float32 `[..., n_times]` by linear interpolation with the end points aligned.

    Output sample j sits at input position j * (L - 1) / (n_times - 1) - the same maths as the
    authors' scipy `interp1d(linspace(0, 1, L), x)(linspace(0, 1, n_times))` and as
    `F.interpolate(mode="linear", align_corners=True)`, but computed in float64 (torch's float32
    source positions are off by up to ~1e-5 near the end of a window).
    """
    length = x.shape[-1]
    if length == n_times:
        return x.float()
    position = torch.linspace(0, length - 1, n_times, dtype=torch.float64)
    left = position.floor().long().clamp(max=length - 2)
    weight = position - left
    x = x.double()
    return (x[..., left] * (1 - weight) + x[..., left + 1] * weight).float()


def open_rgb(path: str | os.PathLike, where: str | None = None) -> Image.Image:
    """An image file as 8-bit RGB (decoded now), or a DataError naming the file (`where`: how to get it).

    The one image opener of the package: the datasets, stage 3's scoring and the demo read through it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}" + (f" ({where})" if where else ""))
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as err:  # noqa: BLE001 - any decoder error means the file is damaged (see unreadable_images)
        raise DataError(f"image {path} could not be read: {type(err).__name__}: {err}") from err
    return to_rgb8(img, path)


# Integer images deeper than 8 bits (PIL's "I;16*" and "I": 16-bit greyscale PNG/TIFF) hold 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(img: Image.Image, path: Any = "image") -> Image.Image:
    """A decoded image as 8-bit RGB, by its mode: 16-bit greyscale scaled by 255/65535 (PIL's own
    convert clips it, so most of it reads as white); transparency (RGBA, LA, PA, a palette or greyscale
    with a transparent colour) composited over white; palette, greyscale, CMYK, YCbCr through PIL's
    conversion. A floating-point image has no agreed range: a DataError naming the file."""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.round(values * (255 / 65535)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "F":
        raise DataError(f"{path} is a floating-point image (PIL mode F), which has no agreed range of values: save "
                        "it as an 8- or 16-bit image")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def to_unit_range(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] -> [3, size, size], bilinear with antialiasing (torchvision's Resize on tensors).

    The filter weights are non-negative, so values stay in [-1, 1].
    """
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """An image file -> float32 [3, image_size, image_size] in [-1, 1] (aspect ratio not kept)."""
    return resize_square(to_unit_range(open_rgb(path)), image_size)


def default_clip_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """CLIP ViT-L/14's own preprocessing at `size` (transformers' classic CLIPImageProcessor):
    a PIL RGB image -> float32 [3, size, size]."""

    return ProcessorTransform(size)


def random_crop_resize(image_size: int, crop_size: int) -> v2.Compose:
    """The train-time crop of `[3, image_size, image_size]` images (torchvision's transforms): a random
    `crop_size` square, its top then its left drawn from torch's global RNG (none when crop_size ==
    image_size: the crop is the whole image), resized back to image_size (bilinear, antialiased)."""
    return v2.Compose([v2.RandomCrop(crop_size), v2.Resize([image_size, image_size])])


def unreadable_images(paths: Sequence[Path] | dict) -> list[tuple[Path, str]]:
    """(path, why) for every image that cannot be decoded (zero bytes, truncated, not an image)."""
    broken = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
        # A damaged file can make PIL's decoders raise almost anything (OSError, SyntaxError,
        # struct.error, zlib.error, DecompressionBombError): all of them mean "cannot be decoded".
        except Exception as err:  # noqa: BLE001
            broken.append((Path(path), f"{type(err).__name__}: {err}" if str(err) else type(err).__name__))
    return broken


def image_fields(original: Image.Image, image_size: int, clip_transform: Callable | None, augment: bool,
                 crop_probability: float, crop_size: int) -> dict[str, torch.Tensor]:
    """`image` (RGB in [-1, 1] at image_size, the train-time random crop when `augment`) and
    `clip_pixel_values` (CLIP's input from the un-augmented original) of a paired item."""
    image = resize_square(to_unit_range(original), image_size)
    # Our own draw rather than v2.RandomApply's, which compares in float32 (p = 0.7 would differ once in 2**24)
    if augment and float(torch.rand(1)) < crop_probability:
        image = random_crop_resize(image_size, crop_size)(image)
    fields = {"image": image}
    if clip_transform is not None:  # None: the CLIP embeddings come from a cache (data/stage2_cache.py)
        fields["clip_pixel_values"] = clip_transform(original)
    return fields
