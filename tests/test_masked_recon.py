"""Stage 1's learning check (evaluation/masked_recon.py): the reconstruction of the hidden samples
against linear interpolation across them, both scored on the hidden samples only."""

import torch

from dreamdiffusion.evaluation.masked_recon import hidden_samples, interpolate_hidden, masked_correlation


def test_interpolation_fills_gaps_linearly_and_holds_the_edges():
    eeg = torch.tensor([[[0.0, 1.0, 5.0, 9.0, 4.0, 2.0]]])
    hidden = torch.tensor([[True, False, True, True, False, True]])
    filled = interpolate_hidden(eeg, hidden)
    # visible samples unchanged; 1 -> 4 across two hidden samples: 2, 3; the edges hold the nearest visible
    assert filled.tolist() == [[[1.0, 1.0, 2.0, 3.0, 4.0, 4.0]]]
    assert torch.equal(interpolate_hidden(eeg, torch.ones_like(hidden)), torch.zeros_like(eeg))


def test_correlation_counts_the_hidden_samples_only():
    torch.manual_seed(0)
    eeg = torch.randn(3, 4, 32)
    hidden = hidden_samples(torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]]), patch_size=8)
    assert hidden.shape == (3, 32) and hidden[0, :8].all() and not hidden[0, 8:16].any()
    # anything at the visible samples does not count: a perfect copy of the hidden ones scores 1
    spoiled = torch.where(hidden[:, None, :], eeg, torch.randn(3, 4, 32))
    assert masked_correlation(spoiled, eeg, hidden).item() > 0.999
    assert abs(masked_correlation(torch.randn(3, 4, 32), eeg, hidden).item()) < 0.3
    # a smooth signal is easy to interpolate: the baseline an MAE must beat is not zero
    t = torch.linspace(0, 1, 32)
    smooth = torch.sin(2 * torch.pi * t)[None, None].repeat(3, 4, 1)
    assert masked_correlation(interpolate_hidden(smooth, hidden), smooth, hidden).item() > 0.5
