"""The terminal tells our story: our lines, progress and results; third-party chatter only with --verbose."""

import logging
import os
import subprocess
import sys
import warnings

import pytest

from conftest import REPO_ROOT
from dreamdiffusion.core import logs
from dreamdiffusion.data.synthetic import write_synthetic_pretrain_corpus


@pytest.fixture
def restore_logging():
    levels = {name: logging.getLogger(name).level for name in [*logs.THIRD_PARTY_QUIET, "py.warnings", "dreamdiffusion"]}
    filters = list(logging.getLogger("py.warnings").filters)
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger("py.warnings").filters[:] = filters
    logging.captureWarnings(False)


def test_third_party_reports_and_known_noise_are_captured_ours_are_not(restore_logging, caplog):
    logs.configure_logging(verbose=False)
    with caplog.at_level(logging.INFO, logger="dreamdiffusion"):
        logging.getLogger("transformers.modeling_utils").warning("Some weights were not used: UNEXPECTED ...")
        logging.getLogger("diffusers.models.modeling_utils").warning("`accelerate` was not found ...")
        logging.getLogger("dreamdiffusion.train.stage1").info("stage 1: 16 training windows")
    shown = [r.getMessage() for r in caplog.records if logging.getLogger(r.name).isEnabledFor(r.levelno)]
    assert shown == ["stage 1: 16 training windows"]

    noise = logging.getLogger("py.warnings").filters[-1]
    record = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1,
                               "/x/site-packages/pytorch_lightning/fit_loop.py:538: Found 482 module(s) in eval mode", None, None)
    deprecation = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1,
                                    "/x/site-packages/pytorch_lightning/_pytree.py:21: `LeafSpec` is deprecated", None, None)
    ours = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1,
                             "/repo/code/dreamdiffusion/x.py:3: UserWarning: something real", None, None)
    assert not noise.filter(record) and not noise.filter(deprecation) and noise.filter(ours)


def test_verbose_keeps_everything(restore_logging, monkeypatch):
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    logging.getLogger("transformers").setLevel(logging.NOTSET)
    logs.configure_logging()
    assert logging.getLogger("transformers").getEffectiveLevel() <= logging.WARNING
    assert logging.getLogger("dreamdiffusion").level == logging.DEBUG


def test_a_stage_run_prints_our_lines_and_no_third_party_setup(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "run"
    write_synthetic_pretrain_corpus(corpus, n_files=8, channel_counts=(8,), length_range=(100, 160), seed=0)
    args = [f"output_dir={out}", f"data.root={corpus}", "data.n_channels=8", "data.n_times=64", "encoder.n_channels=8",
            "encoder.n_times=64", "encoder.embed_dim=16", "encoder.depth=1", "encoder.num_heads=2",
            "decoder.decoder_embed_dim=16", "decoder.decoder_depth=1", "decoder.decoder_num_heads=2", "batch_size=4",
            "epochs=1", "warmup_epochs=0", "trainer.accelerator=cpu", "trainer.num_workers=0",
            "trainer.progress_bar=false", "figure_every_n_epochs=0"]
    env = {k: v for k, v in os.environ.items() if k != logs.VERBOSE_ENV}
    run = subprocess.run([sys.executable, str(REPO_ROOT / "code" / "stage1_pretrain_eeg.py"), *args],
                         capture_output=True, text=True, env=env, timeout=300)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text
    assert "stage 1:" in text
    for chatter in ("GPU available", "Trainable params", "site-packages"):
        assert chatter not in text, text

    verbose = subprocess.run([sys.executable, str(REPO_ROOT / "code" / "stage1_pretrain_eeg.py"), "--verbose",
                              *[a if not a.startswith("output_dir=") else f"output_dir={tmp_path / 'v'}" for a in args]],
                             capture_output=True, text=True, env=env, timeout=300)
    assert verbose.returncode == 0 and "GPU available" in verbose.stdout + verbose.stderr


def test_warnings_of_our_own_still_show(restore_logging, caplog):
    logs.configure_logging(verbose=False)
    with caplog.at_level(logging.WARNING, logger="py.warnings"), warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert any("a real problem" in r.getMessage() for r in caplog.records)
