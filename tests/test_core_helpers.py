"""The small helpers written once in core/: the [-1, 1] -> uint8 conversion, Pearson's r, the device
setting. Each is checked against the expressions it replaced (to the bit) or against numpy."""

import numpy as np
import pytest
import torch
from torchvision.utils import make_grid

from dreamdiffusion.core.devices import resolve_device
from dreamdiffusion.core.errors import ConfigError
from dreamdiffusion.core.images import to_uint8
from dreamdiffusion.core.stats import pearson_r, pearson_r_all_pairs, pearson_r_torch, unit_rows


def _with_rounding_boundaries(shape, seed=0):
    """Values in [-1.1, 1.1] (clamped by the conversion), with the float32 neighbours of every k + 0.5."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2.2 - 1.1
    half = (torch.arange(256.0) + 0.5) / 127.5 - 1
    edges = torch.cat([half, torch.nextafter(half, torch.tensor(2.0)), torch.nextafter(half, torch.tensor(-2.0))])
    flat = x.flatten()
    flat[: len(edges)] = edges[: len(flat)]
    return flat.reshape(shape)


def test_to_uint8_is_each_conversion_it_replaced_to_the_bit():
    one = _with_rounding_boundaries((3, 40, 40))
    batch = _with_rounding_boundaries((4, 3, 24, 24), seed=1)
    trials = _with_rounding_boundaries((2, 3, 3, 16, 16), seed=2)
    # a dataset image saved as test{i}-0.png (generation, stage 2's validation grid)
    assert np.array_equal(to_uint8(one), ((one.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())
    # the metrics' batch layout
    assert np.array_equal(to_uint8(batch), ((batch.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                          .permute(0, 2, 3, 1).numpy())
    # the pipeline's [n_trials, n_images_per_eeg, 3, H, W] output
    clamped = trials.float().clamp(-1, 1)
    assert np.array_equal(to_uint8(trials), ((clamped + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy())
    # the demo's sample grid, which went through [0, 1] first
    grid = make_grid((trials.flatten(0, 1).clamp(-1, 1) + 1) / 2, nrow=3, padding=0)
    assert np.array_equal(to_uint8(make_grid(trials.flatten(0, 1), nrow=3, padding=0)),
                          (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1).expand(3, 3, 1, 1)).ravel().tolist()[:3] == [0, 128, 255]


def test_pearson_r_in_each_form_is_numpys():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 50))
    b = 0.5 * a + rng.normal(size=(6, 50))
    b[2] = 3.0  # a constant row: r is undefined, given as 0
    expected = [np.corrcoef(x, y)[0, 1] if np.ptp(y) else 0.0 for x, y in zip(a, b)]
    assert pearson_r(a, b) == pytest.approx(expected, abs=1e-12)
    assert pearson_r(a.astype(np.uint8), a.astype(np.uint8)) == pytest.approx(np.ones(6))
    full = np.corrcoef(a, b[[0, 1, 3]])[:6, 6:]
    assert pearson_r_all_pairs(a, b[[0, 1, 3]]) == pytest.approx(full, abs=1e-12)
    assert np.allclose(np.linalg.norm(unit_rows(a), axis=1), 1) and not unit_rows(b)[2].any()
    x, y = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    assert pearson_r_torch(x, y).numpy() == pytest.approx(expected, abs=1e-5)


def test_resolve_device_names_the_setting_when_it_is_wrong():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda but no CUDA GPU is available"):
            resolve_device("cuda")
