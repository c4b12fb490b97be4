"""The packed stage-1 corpus: the same samples as the folder it was packed from, a start-up that trusts
its check record and re-checks only what changed, and the content checks when packing."""

import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from dreamdiffusion.config import PretrainDataConfig
from dreamdiffusion.core.errors import DataError, run_cli
from dreamdiffusion.data import packed_corpus
from dreamdiffusion.data.check_record import fingerprint
from dreamdiffusion.data.packed_corpus import CORPUS_FILE, INDEX_FILE, PackedEEGDataset, pack_folder
from dreamdiffusion.dataset import EEGPretrainDataset, open_pretrain_corpus


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


@pytest.fixture()
def folder(tmp_path):
    """Windows that take every branch of the crop: longer and shorter than n_times, fewer and more
    channels than n_channels, float64 and float16, in nested folders."""
    rng = np.random.default_rng(0)
    src = tmp_path / "windows"
    shapes = [(8, 100), (8, 40), (3, 90), (12, 64), (12, 200), (5, 33), (8, 64), (3, 500)]
    for k, (c, t) in enumerate(shapes):
        dtype = (np.float32, np.float64, np.float16)[k % 3]
        _save(src / f"sub-{k % 3}" / f"win-{k}.npy", (10 * rng.standard_normal((c, t))).astype(dtype))
    return src


def _pair(folder, dst, **kwargs):
    pack_folder(folder, dst)
    settings = dict(n_channels=8, n_times=64, scale=0.1, **kwargs)
    return EEGPretrainDataset(folder, check_record=False, **settings), PackedEEGDataset(dst, **settings)


def test_packed_gives_the_same_samples_as_the_folder(folder, tmp_path):
    plain, packed = _pair(folder, tmp_path / "packed")
    assert len(plain) == len(packed) == 8
    for seed in range(3):
        for i in range(len(plain)):
            torch.manual_seed(seed)
            a = plain[i]["eeg"]
            torch.manual_seed(seed)
            b = packed[i]["eeg"]
            assert a.shape == (8, 64) and a.dtype == torch.float32
            assert torch.equal(a, b), (seed, i)
    # through DataLoader workers (each maps the shards itself) with a seeded shuffle, and a val split
    order = np.random.default_rng(1).permutation(8)
    for a_set, b_set in [(plain, packed), (plain.select(order[:5]), packed.select(order[:5]))]:
        batches = []
        for dataset in (a_set, b_set):
            loader = DataLoader(dataset, batch_size=3, shuffle=True, num_workers=2,
                                generator=torch.Generator().manual_seed(7))
            batches.append(torch.cat([b["eeg"] for b in loader]))
        assert torch.equal(*batches)
    assert len(pickle.dumps(packed)) < 10_000  # the shards' bytes never travel to a worker


def test_the_packed_files_and_what_corpus_json_records(folder, tmp_path):
    dst = tmp_path / "packed"
    corpus = pack_folder(folder, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["corpus.json", "eeg_c12.bin", "eeg_c3.bin", "eeg_c5.bin",
                                                     "eeg_c8.bin", "index.bin", "sources.txt"]
    assert corpus["n_windows"] == 8 and corpus["skipped"] == [] and "finite" in corpus["checks"]
    index = np.fromfile(dst / INDEX_FILE, dtype="<i8").reshape(8, 4)
    sources = (dst / "sources.txt").read_text().splitlines()
    assert sources == [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*.npy"))]
    for (shard, offset, c, t), source in zip(index, sources):
        original = np.load(folder / source)
        flat = np.memmap(dst / corpus["shards"][shard]["file"], dtype="<f4", mode="r")
        np.testing.assert_array_equal(flat[offset:offset + c * t].reshape(c, t), original.astype(np.float32))
    for shard in corpus["shards"]:
        assert shard["fingerprint"] == fingerprint(dst / shard["file"])
        assert (dst / shard["file"]).stat().st_size == 4 * shard["elements"]


def _poke(path, window, value):
    """Set every value of a window (a row of index.bin) of a shard without changing the shard's size
    or modification time."""
    _, offset, n_chans, n_times = window
    stamp = os.stat(path)
    flat = np.memmap(path, dtype="<f4", mode="r+")
    flat[offset:offset + n_chans * n_times] = value
    flat.flush()
    del flat
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def test_start_up_trusts_the_fingerprints_and_rechecks_a_changed_shard(folder, tmp_path, caplog):
    dst = tmp_path / "packed"
    pack_folder(folder, dst)
    index = np.fromfile(dst / INDEX_FILE, dtype="<i8").reshape(-1, 4)
    shard_file = json.loads((dst / CORPUS_FILE).read_text())["shards"][index[0, 0]]["file"]
    _poke(dst / shard_file, index[0], np.nan)
    # Same size and mtime: the start-up does not read the shard, so it does not see the NaN.
    trusting = PackedEEGDataset(dst, n_channels=8, n_times=64)
    assert len(trusting) == 8 and not torch.isfinite(trusting[0]["eeg"]).all()

    os.utime(dst / shard_file)  # now the fingerprint differs: the shard is read again
    with pytest.raises(DataError, match="sub-0/win-0.npy.*NaN") as err:
        PackedEEGDataset(dst, n_channels=8, n_times=64)
    assert "skip_bad_files" in str(err.value)
    with caplog.at_level(logging.INFO, logger="dreamdiffusion.data.packed_corpus"):
        skipping = PackedEEGDataset(dst, n_channels=8, n_times=64, skip_bad_files=True)
    assert len(skipping) == 7 and skipping.skipped[0][0].name == "win-0.npy"
    assert "1 re-checked" in caplog.text
    # A shard with a problem keeps its old fingerprint, so every start checks it again.
    assert json.loads((dst / CORPUS_FILE).read_text())["shards"][index[0, 0]]["fingerprint"] != fingerprint(
        dst / shard_file)

    _poke(dst / shard_file, index[0], 1.0)
    os.utime(dst / shard_file)
    PackedEEGDataset(dst, n_channels=8, n_times=64, write_record=False)  # rank > 0: reads, never writes
    assert json.loads((dst / CORPUS_FILE).read_text())["shards"][index[0, 0]]["fingerprint"] != fingerprint(
        dst / shard_file)
    PackedEEGDataset(dst, n_channels=8, n_times=64)  # rank 0: fine now, recorded
    assert json.loads((dst / CORPUS_FILE).read_text())["shards"][index[0, 0]]["fingerprint"] == fingerprint(
        dst / shard_file)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dreamdiffusion.data.packed_corpus"):
        PackedEEGDataset(dst, n_channels=8, n_times=64)
    assert "0 re-checked" in caplog.text


def test_a_damaged_packed_corpus_is_a_sentence(folder, tmp_path):
    dst = tmp_path / "packed"
    pack_folder(folder, dst)
    shard = dst / "eeg_c8.bin"
    with open(shard, "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(DataError, match="eeg_c8.bin has .* bytes, corpus.json records"):
        PackedEEGDataset(dst, n_channels=8, n_times=64)
    pack_folder(folder, dst)  # packing again in place repairs it
    index = np.fromfile(dst / INDEX_FILE, dtype="<i8").reshape(-1, 4)
    index[2, 1] += 10**6
    index.tofile(dst / INDEX_FILE)
    with pytest.raises(DataError, match="window 2 of index.bin .* does not fit its shard"):
        PackedEEGDataset(dst, n_channels=8, n_times=64)
    (dst / CORPUS_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match="expected 'dreamdiffusion-packed-eeg/1'"):
        PackedEEGDataset(dst, n_channels=8, n_times=64)
    with pytest.raises(DataError, match="not a packed corpus"):
        PackedEEGDataset(folder, n_channels=8, n_times=64)


def test_packing_checks_every_window_and_a_refused_pack_keeps_the_old_corpus(folder, tmp_path):
    dst = tmp_path / "packed"
    pack_folder(folder, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    _save(folder / "z" / "huge.npy", np.full((8, 80), 1e300))  # finite as float64, inf as float32
    with pytest.raises(DataError, match="huge.npy contains NaN or Inf values \\(as float32\\)"):
        pack_folder(folder, dst)  # found while copying, after other windows were written
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before  # nothing half-written
    nan = np.ones((8, 80), np.float32)
    nan[2, 3] = np.nan
    _save(folder / "z" / "nan.npy", nan)
    _save(folder / "z" / "ints.npy", np.zeros((8, 80), np.int16))
    (folder / "z" / "empty.npy").write_bytes(b"")

    corpus = pack_folder(folder, dst, skip_bad_files=True)
    assert {name: why.split(" (")[0] for name, why in corpus["skipped"]} == {
        "z/nan.npy": "contains NaN or Inf values", "z/ints.npy": "has dtype int16, expected floating point EEG",
        "z/empty.npy": "is empty", "z/huge.npy": "contains NaN or Inf values"}
    packed = PackedEEGDataset(dst, n_channels=8, n_times=64)
    assert len(packed) == 8 and packed.n_skipped == 4
    packed.write_skipped(tmp_path / "skipped.txt")
    assert len((tmp_path / "skipped.txt").read_text().splitlines()) == 4


def test_the_folder_check_record_rechecks_only_changed_files(folder, caplog):
    with caplog.at_level(logging.INFO, logger="dreamdiffusion.data.pretrain_corpus"):
        EEGPretrainDataset(folder, n_channels=8, n_times=64)
    assert "checked 8 of 8 files" in caplog.text and (folder / "eeg_checks.json").is_file()
    victim = folder / "sub-0" / "win-0.npy"
    stamp = os.stat(victim)
    array = np.load(victim)
    array[0, 0] = np.nan
    np.save(victim, array)
    os.utime(victim, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same size and mtime: trusted
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dreamdiffusion.data.pretrain_corpus"):
        assert len(EEGPretrainDataset(folder, n_channels=8, n_times=64)) == 8
    assert "checked 0 of 8 files" in caplog.text
    os.utime(victim)
    _save(folder / "new.npy", np.ones((4, 70), np.float32))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dreamdiffusion.data.pretrain_corpus"):
        with pytest.raises(DataError, match="win-0.npy contains NaN"):
            EEGPretrainDataset(folder, n_channels=8, n_times=64)
    assert "checked 2 of 9 files" in caplog.text
    # the record keeps the problem, so a later start with skip_bad_files skips it without reading it
    ds = EEGPretrainDataset(folder, n_channels=8, n_times=64, skip_bad_files=True)
    assert len(ds) == 8 and ds.skipped == [(victim, "contains NaN or Inf values")]


def test_open_pretrain_corpus_and_the_pack_command(folder, tmp_path, capsys):
    dst = tmp_path / "packed"
    assert run_cli(packed_corpus.main, ["pack", str(folder), str(dst)]) == 0
    assert "8 windows in 4 shards" in capsys.readouterr().out
    for root, kind in [(dst, PackedEEGDataset), (folder, EEGPretrainDataset)]:
        cfg = OmegaConf.structured(PretrainDataConfig(root=str(root), n_channels=8, n_times=64))
        assert type(open_pretrain_corpus(cfg)) is kind
    assert run_cli(packed_corpus.main, ["pack", str(tmp_path / "nothing"), str(dst)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (folder / "bad.npy").write_bytes(b"junk")
    assert run_cli(packed_corpus.main, ["pack", str(folder), str(tmp_path / "p2")]) == 2
    assert "bad.npy cannot be read as a .npy array" in capsys.readouterr().err
    # packing a folder into itself: the packed files are not *.npy, so packing it again sees the same windows
    assert run_cli(packed_corpus.main, ["pack", str(folder), str(folder), "--skip-bad-files"]) == 0
    assert run_cli(packed_corpus.main, ["pack", str(folder), str(folder), "--skip-bad-files"]) == 0
    assert PackedEEGDataset(folder, n_channels=8, n_times=64).index.shape == (8, 4)


def test_a_batch_is_cropped_into_one_buffer_with_the_same_samples(folder, tmp_path):
    """DataLoader's batched fetch (`__getitems__`), seeded per item as stage 1's loader seeds, gives the
    items one by one would give, in one buffer that `collate_eeg` hands on without a copy."""
    from dreamdiffusion.dataset import collate_eeg
    from dreamdiffusion.train.lightning import SeededItems

    plain, packed = _pair(folder, tmp_path / "packed")
    keys = [(i, 1000 + 7 * i) for i in (3, 0, 7, 3, 5)]
    for dataset in (plain, packed):
        one_by_one = torch.stack([SeededItems(dataset)[key]["eeg"] for key in keys])
        torch.manual_seed(0)
        before = torch.get_rng_state()
        batch = SeededItems(dataset).__getitems__(keys)
        assert torch.equal(torch.get_rng_state(), before)  # the stream is left as it was
        collated = collate_eeg(batch)["eeg"]
        assert torch.equal(collated, one_by_one)
        assert collated.data_ptr() == batch[0]["eeg"].data_ptr()  # no copy
    torch.manual_seed(3)
    unseeded = packed.__getitems__([1, 2])
    torch.manual_seed(3)
    assert torch.equal(collate_eeg(unseeded)["eeg"], torch.stack([packed[1]["eeg"], packed[2]["eeg"]]))
