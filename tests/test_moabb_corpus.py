"""The MOABB corpus builder, on MOABB's offline FakeDataset."""

import csv

import numpy as np
import pytest
import torch
from scipy.signal import welch

pytest.importorskip("moabb")

from moabb.datasets.fake import FakeDataset  # noqa: E402

from dreamdiffusion.core.errors import run_cli  # noqa: E402
from dreamdiffusion.data.moabb_corpus import MANIFEST_COLUMNS, CorpusSettings, build_pretrain_corpus  # noqa: E402
from dreamdiffusion.dataset import EEGPretrainDataset, PackedEEGDataset  # noqa: E402


def fake(sfreq=128):
    # 2 subjects x 1 session x 2 runs of 10 s, channels C3 Cz C4 + a stim channel
    return FakeDataset(n_subjects=2, n_sessions=1, n_runs=2, duration=10, n_events=5, sfreq=sfreq, seed=7)


def read_manifest(out):
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_builder_writes_windows_manifest_and_summary(tmp_path):
    out = tmp_path / "corpus"
    summary = build_pretrain_corpus([fake()], out, CorpusSettings(), log=lambda _: None)

    rows = read_manifest(out)
    assert list(rows[0]) == MANIFEST_COLUMNS
    assert len(rows) == 2 * 2 * 5  # subjects x runs x (10 s / 2 s windows)
    assert {(r["subject"], r["session"], r["run"]) for r in rows} == {
        (s, "0", r) for s in ("1", "2") for r in ("0", "1")}
    for r in rows:
        assert (r["dataset"], r["n_channels"], r["n_times"]) == ("FakeDataset", "3", "2000")  # stim dropped
        assert float(r["sfreq"]) == 1000.0 and float(r["orig_sfreq"]) == 128.0
        # 95 Hz is above 128 Hz's Nyquist: the edge drops to 0.9 x 64 Hz, and the manifest says so
        assert float(r["l_freq"]) == 5.0 and float(r["h_freq"]) == pytest.approx(57.6)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert files == sorted(r["file"] for r in rows)
    eeg = np.load(out / rows[0]["file"])
    assert eeg.dtype == np.float32 and eeg.shape == (3, 2000)
    # microvolts (FakeDataset draws 20 uV white noise), band-passed: little power below 3 Hz or above 70 Hz
    assert 1 < eeg.std() < 100
    freqs, power = welch(np.stack([np.load(out / r["file"]) for r in rows]), fs=1000, nperseg=500, axis=-1)
    power = power.mean(axis=(0, 1))
    in_band = power[(freqs > 8) & (freqs < 50)].mean()
    assert power[freqs < 2].mean() < 0.05 * in_band and power[freqs > 75].mean() < 0.05 * in_band

    assert summary["total_windows"] == 20 and summary["windows_written"] == 20
    assert summary["datasets"]["FakeDataset"]["h_freq_used"] == [57.6]
    assert (out / "summary.json").is_file() and "FakeDataset" in (out / "summary.txt").read_text()
    loaded = EEGPretrainDataset(out, n_channels=8, n_times=512)
    assert len(loaded) == 20 and loaded[0]["eeg"].shape == (8, 512)
    # The builder packs its windows for stage 1 (in the same folder): the same samples for the same seed.
    assert summary["packed"]["windows"] == 20 and summary["packed"]["shards"] == ["eeg_c3.bin"]
    packed = PackedEEGDataset(out, n_channels=8, n_times=512)
    for i in (0, 7, 19):
        torch.manual_seed(i)
        expected = loaded[i]["eeg"]
        torch.manual_seed(i)
        assert torch.equal(packed[i]["eeg"], expected)


def test_second_run_skips_what_exists(tmp_path):
    out = tmp_path / "corpus"
    build_pretrain_corpus([fake()], out, CorpusSettings(), log=lambda _: None)
    first = read_manifest(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}

    again = build_pretrain_corpus([fake()], out, CorpusSettings(), log=lambda _: None)
    assert again["subjects_skipped_done"] == 2 and again["windows_written"] == 0
    assert read_manifest(out) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")} == stamps

    # An interrupted subject (no done.json, one window missing) is redone, existing windows are kept.
    (out / "FakeDataset" / "sub-2" / "done.json").unlink()
    missing = out / "FakeDataset" / "sub-2" / "ses-0_run-1_win-00003.npy"
    missing.unlink()
    third = build_pretrain_corpus([fake()], out, CorpusSettings(), log=lambda _: None)
    assert (third["windows_written"], third["windows_present"], third["subjects_skipped_done"]) == (1, 9, 1)
    assert missing.is_file() and read_manifest(out) == first
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != missing)


def test_cli_and_errors(tmp_path, capsys):
    from dreamdiffusion.data import moabb_corpus as script
    out = tmp_path / "cli"
    summary = script.main(["moabb.datasets.fake.FakeDataset", "--out", str(out), "--subjects", "1",
                           "--sfreq", "256", "--window-seconds", "30"])
    # FakeDataset's default: 2 sessions x 2 runs of 120 s -> 4 x 4 windows of 30 s at 256 Hz
    assert summary["total_windows"] == 16
    assert {r["n_times"] for r in read_manifest(out)} == {str(30 * 256)}
    assert run_cli(script.main, ["NoSuchDataset", "--out", str(out)]) == 2
    assert "'NoSuchDataset' is not a MOABB dataset" in capsys.readouterr().err
    assert run_cli(script.main, ["Shin2017A", "--out", str(out)]) == 2
    assert "--accept-licenses" in capsys.readouterr().err
    assert run_cli(script.main, ["moabb.datasets.fake.FakeDataset", "--l-freq", "50", "--h-freq", "40"]) == 2
