"""Rules that only a GPU run would expose, checked on the CPU (docs/gpu.md): dtypes under bf16
autocast, networks on another device (`meta`), non-finite latents, precision choices, the memory
accounting against hand counts, loader seeding, and 2-process DDP (gloo) for the reduced train metrics.
`benchmarks/gpu_report.py` runs the same checks on CUDA."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import REPO_ROOT
from dreamdiffusion.core.errors import ConfigError, NonFiniteError, run_cli
from dreamdiffusion.core.files import safe_torch_load
from dreamdiffusion.core.memory import estimate, kept_activation_bytes, store_frozen_at
from dreamdiffusion.core.precision import generation_dtype
from dreamdiffusion.evaluation import stage3
from dreamdiffusion.evaluation.metrics import DistributionMetrics
from dreamdiffusion.models.dreamdiffusion import clip_alignment_loss
from dreamdiffusion.models.pipeline import DreamDiffusionPipeline, NonFiniteLatentsError, check_finite_latents
from dreamdiffusion.train.lightning import SeededItems, SeededSampler, adamw, resolve_precision
from stage2_tiny import tiny_batch, tiny_model
from test_stage3 import build_world


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# fp32 where the arithmetic needs it


def test_latents_out_of_the_vae_are_fp32_under_bf16_autocast_and_from_a_bf16_vae():
    model = tiny_model()
    images = tiny_batch(2)["image"]
    with bf16_autocast():
        assert model.encode_images(images).dtype == torch.float32
    model.vae.to(torch.bfloat16)  # a VAE stored in half precision: the latents are still fp32
    with bf16_autocast():
        assert model.encode_images(images).dtype == torch.float32


def test_the_noise_schedule_runs_in_fp32_under_bf16_autocast():
    """The UNet's input x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, recomputed in float64 from the same draws."""
    model = tiny_model()
    batch = tiny_batch(3)
    seen = {}
    model.unet.register_forward_pre_hook(lambda module, args: seen.update(x_t=args[0].detach().clone()))
    torch.manual_seed(7)
    with bf16_autocast():
        model.training_losses(batch)
    torch.manual_seed(7)  # the same draws: posterior sample, noise, timesteps
    with bf16_autocast():
        latents = model.encode_images(batch["image"])
    noise = torch.randn_like(latents)
    t = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (len(latents),))
    alpha_bar = model.noise_scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * latents.double() + (1 - alpha_bar).sqrt() * noise.double()
    assert seen["x_t"].dtype == torch.float32
    torch.testing.assert_close(seen["x_t"].double(), expected, rtol=1e-6, atol=1e-6)  # bf16 would be ~1e-2 off


@pytest.mark.parametrize("kind", ["contrastive", "cosine"])
def test_alignment_logits_are_fp32_under_bf16_autocast(kind):
    g = torch.Generator().manual_seed(0)
    eeg, image = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    with bf16_autocast():
        loss = clip_alignment_loss(eeg, image, kind, temperature=0.07)
    reference = clip_alignment_loss(eeg.double(), image.double(), kind, temperature=0.07)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(reference)) < 1e-5


def test_sampling_keeps_fp32_latents_with_a_bf16_unet():
    model = tiny_model(clip=None)
    pipe = DreamDiffusionPipeline.from_model(model)
    pipe.unet.to(torch.bfloat16)
    pipe.vae.to(torch.bfloat16)  # the conditioner stays fp32, as stage 3 keeps it
    pipe.set_progress_bar_config(disable=True)
    eeg = tiny_batch(2)["eeg"]
    for sampler in ("plms", "dpm++"):
        latents = pipe(eeg, num_images_per_eeg=1, num_inference_steps=3, sampler=sampler, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
        assert latents.dtype == torch.float32 and torch.isfinite(latents).all()


# ---------------------------------------------------------------------------------------------
# Networks on another device, non-finite latents, precision choices


class _TinyFeatures(nn.Module):
    """A feature network with parameters (so it has a device) and no `num_features`: uint8 -> [N, 5]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, images):
        return self.conv(images.float() / 255).mean(dim=(2, 3))


def test_the_fid_metric_is_built_with_its_network_on_another_device():
    # torchmetrics would push a CPU dummy image through the network to learn its output size; on a
    # GPU (here: `meta`) that fails. The size is found on the network's own device instead.
    metrics = DistributionMetrics(_TinyFeatures().to("meta"))
    assert metrics.device.type == "meta" and metrics.fid.inception.num_features == 5
    metrics = DistributionMetrics(_TinyFeatures())  # and the same network still scores on the CPU
    g = torch.Generator().manual_seed(0)
    for real in (True, False):
        metrics.update(torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8), real=real)
    assert np.isfinite(metrics.compute()["fid"])


def test_non_finite_latents_stop_the_pipeline_naming_trial_and_slot():
    latents = torch.zeros(6, 4, 2, 2)
    check_finite_latents(latents, 2, torch.float32)
    latents[3, 1, 0, 0] = float("nan")
    latents[5, 0, 1, 1] = float("inf")
    with pytest.raises(NonFiniteLatentsError, match="2 image") as err:
        check_finite_latents(latents, 2, torch.float16)
    assert err.value.images == [(1, 1), (2, 1)] and "fp16's range" in str(err.value)
    assert isinstance(err.value, NonFiniteError)


def test_a_non_finite_latent_stops_stage3_with_a_sentence_naming_the_trial(tmp_path, capsys):
    world = build_world(tmp_path / "world")
    model = tiny_model(seed=0, clip=None)
    with torch.no_grad():  # finite weights whose output overflows fp32: eps = inf, the latents NaN
        model.unet.conv_out.weight.fill_(3e38)
    DreamDiffusionPipeline.from_model(model).save_pretrained(tmp_path / "overflowing")
    out = tmp_path / "out"
    code = run_cli(stage3.main, [*world["args"], f"model={tmp_path / 'overflowing'}", f"output_dir={out}",
                                 "phase=generate", "max_trials=2"])
    message = capsys.readouterr().err
    assert code == 2 and "trial 0" in message and "not finite" in message, message
    assert not list((out / "images").glob("test0-*.png"))  # nothing of that trial was written


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"a GPU of capability {capability}")


def test_generation_precision_auto_is_bf16_only_where_native(monkeypatch):
    assert generation_dtype("auto", torch.device("cpu")) == torch.float32
    assert generation_dtype("fp16", torch.device("cpu")) == torch.float16  # by name only
    with pytest.raises(ConfigError, match="precision must be"):
        generation_dtype("half", torch.device("cpu"))
    _fake_gpu(monkeypatch, (9, 0))
    assert generation_dtype("auto", torch.device("cuda")) == torch.bfloat16
    _fake_gpu(monkeypatch, (7, 0))
    assert generation_dtype("auto", torch.device("cuda")) == torch.float32  # fp16 never chosen for the user
    with pytest.raises(ConfigError, match="no native bf16"):
        generation_dtype("bf16", torch.device("cuda"))


def test_training_precision_auto_is_bf16_only_where_native(monkeypatch):
    assert resolve_precision("auto", "cpu") == "32-true"
    _fake_gpu(monkeypatch, (8, 0))
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    _fake_gpu(monkeypatch, (7, 5))
    assert resolve_precision("auto", "gpu") == "32-true"
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"
    with pytest.raises(ConfigError, match="no native bf16"):
        resolve_precision("bf16-mixed", "gpu")


def test_adamw_is_fused_only_on_a_gpu():
    params = [nn.Parameter(torch.zeros(3))]
    assert not adamw(params, lr=1e-3).defaults["fused"]  # the CPU keeps torch's default implementation


def test_checkpoint_files_load_memory_mapped_and_old_format_files_still_load(tmp_path):
    state = {"state_dict": {"model.diffusion_model.w": torch.arange(6.0)}}
    torch.save(state, tmp_path / "zip.ckpt")
    torch.save(state, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)  # cannot be mapped
    for name in ("zip.ckpt", "legacy.ckpt"):
        loaded = safe_torch_load(tmp_path / name, "Stable Diffusion checkpoint", mmap=True)
        assert torch.equal(loaded["state_dict"]["model.diffusion_model.w"], torch.arange(6.0))


# ---------------------------------------------------------------------------------------------
# Memory: the estimate against hand counts; frozen layers stored at the autocast dtype


class _Blocks(nn.Module):
    """x [N, 10] -> Linear(10, 16) -> 3 x (Linear(16, 64) -> Tanh -> Linear(64, 16)) -> sum."""

    def __init__(self, checkpointed: bool):
        super().__init__()
        self.checkpointed = checkpointed
        self.pre = nn.Linear(10, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16)) for _ in range(3))

    def forward(self, x):
        h = self.pre(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointed else block(h)
        return h.sum()


def test_the_estimate_counts_checkpointed_block_inputs_and_the_recomputation():
    torch.manual_seed(0)
    f32 = 4
    plain, ckpt = _Blocks(False), _Blocks(True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(7, 10)
    # without checkpointing, per sample: the first Linear keeps x [10]; each block keeps its input [16]
    # and the Tanh output [64] (kept by Tanh and the second Linear: one storage)
    kept = kept_activation_bytes(plain, lambda: plain(x))
    assert (kept.saved, kept.other) == (7 * (10 + 3 * (16 + 64)) * f32, 0)
    # with checkpointing only x and the three block inputs are kept
    assert kept_activation_bytes(ckpt, lambda: ckpt(x)).total == 7 * (10 + 3 * 16) * f32
    est_plain = estimate(plain, lambda b: plain(torch.randn(b, 10)), "32-true", False)
    est = estimate(ckpt, lambda b: ckpt(torch.randn(b, 10)), "32-true", True, world_size=2)
    assert (est_plain.activations_per_sample, est.activations_per_sample) == ((10 + 3 * 80) * f32, (10 + 3 * 16) * f32)
    # the backward recomputes a block ([64] per sample come back): the step's peak per sample is above
    # what is kept, and below the plain step's
    assert est.activations_per_sample + 64 * f32 <= est.step_peak_per_sample < est_plain.step_peak_per_sample
    assert est.ddp_buckets == est.gradients and est.cuda_context == 0  # DDP's buckets: one more gradient copy
    assert est.step_activations(5) >= est.activations(5) + est.gradients


def test_frozen_matrices_stored_at_the_autocast_dtype_change_no_loss():
    model = tiny_model(seed=3)
    batch = tiny_batch(3, seed=1)

    def losses():
        torch.manual_seed(0)
        with bf16_autocast(), torch.no_grad():
            return {k: float(v) for k, v in model.training_losses(batch).items()}

    before = losses()
    saved = store_frozen_at(model.clip_encoder, torch.bfloat16)
    assert saved > 0 and losses() == before  # bit for bit: autocast cast those weights the same way
    norms = [m for m in model.clip_encoder.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# Loader workers that persist across epochs


class _Draws(torch.utils.data.Dataset):
    """Item i: (i, a draw from torch's global stream) - like the stage-1 corpus's random crops."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"index": i, "draw": torch.randint(0, 10**9, (1,))}


def test_seeded_items_depend_on_seed_epoch_and_index_only():
    items = SeededItems(_Draws())
    sampler = SeededSampler(torch.utils.data.DistributedSampler(_Draws(), num_replicas=1, rank=0, seed=3), seed=3)
    first = [items[key]["draw"] for key in sampler]
    torch.manual_seed(123)  # another global stream (another worker, another history): the same items
    assert [items[key]["draw"] for key in sampler] == first
    sampler.set_epoch(1)
    assert [items[key]["draw"] for key in sampler] != first
    sampler.set_epoch(0)
    state = torch.get_rng_state()
    items[(0, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is left as it was
    loader = torch.utils.data.DataLoader(items, batch_size=2, sampler=sampler, num_workers=1, persistent_workers=True)
    assert torch.cat([b["draw"] for b in loader]).flatten().tolist() == torch.cat(first).tolist()  # in a worker too


# ---------------------------------------------------------------------------------------------
# 2-process DDP (gloo): stage 2's train metrics are reduced over both processes

DDP_SCRIPT = r'''
import json, sys
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from dreamdiffusion.config import Stage2Config, to_container
from dreamdiffusion.train.lightning import RunStats
from dreamdiffusion.train.stage2 import Stage2Module
from stage2_tiny import tiny_batch, tiny_model

class Items(torch.utils.data.Dataset):
    def __init__(self):
        self.batch = tiny_batch(8, seed=4)
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}

class Record(pl.Callback):
    """Each process's own weighted loss sum; at the epoch's end, the logged value beside the mean over both."""
    def __init__(self):
        self.sum = self.n = 0.0
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.sum += float(outputs["loss"]) * len(batch["eeg"]); self.n += len(batch["eeg"])
    def on_train_epoch_end(self, trainer, module):
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        both = trainer.strategy.all_gather(torch.tensor([self.sum, self.n], dtype=torch.float64))
        if trainer.is_global_zero:
            json.dump({"logged": logged, "mean_over_processes": float(both[:, 0].sum() / both[:, 1].sum()),
                       "mean_of_rank_0": self.sum / self.n, "world_size": trainer.world_size}, open(sys.argv[1], "w"))

config = to_container(OmegaConf.structured(Stage2Config))
config.update(batch_size=2, sample_every_n_epochs=0, classifier=None)
module = Stage2Module(tiny_model(seed=0), config)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[Record(), RunStats(sys.argv[2])], num_sanity_val_steps=0)
loader = torch.utils.data.DataLoader(Items(), batch_size=2)
trainer.fit(module, train_dataloaders=loader)
'''


def test_stage2_train_metrics_are_reduced_across_two_gloo_processes(tmp_path):
    script = tmp_path / "ddp_stage2.py"
    script.write_text(DDP_SCRIPT)
    out, runtime = tmp_path / "metrics.json", tmp_path / "runtime.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT / "code"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(script), str(out), str(runtime)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    logged, both, own = report["logged"]["train/loss_epoch"], report["mean_over_processes"], report["mean_of_rank_0"]
    assert abs(logged - both) < 1e-5 * max(1.0, abs(both)) and abs(own - both) > 1e-4, report
    assert {"train/diffusion_epoch", "train/clip_epoch", "train/loss_step"} <= set(report["logged"])
    stats = json.loads(runtime.read_text())  # RunStats: timed without synchronising, numerics recorded
    assert stats["step_timing"].startswith("wall clock") and stats["timed_steps"] == stats["steps"] == 2
    assert stats["numerics"]["tf32_matmul"] is False and stats["fused_adamw"] is False


# ---------------------------------------------------------------------------------------------
# `make gpu-report` at toy sizes: every row runs on the CPU


def test_the_gpu_report_runs_every_row_at_toy_sizes_on_the_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_report.py"), "--tiny",
                             "--out-dir", str(tmp_path)], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    rows = [*report["stage1"], *report["loader"], *report["stage2"], *report["generation"], *report["checks"]]
    assert not [row for row in rows if "error" in row], rows
    assert len(report["loader"]) == 2 and len(report["stage2"]) == 8 and len(report["generation"]) == 4
    assert {(r["gradient_checkpointing"], r["clip"]) for r in report["stage2"]} == {
        (c, k) for c in (False, True) for k in ("every step", "cached")}
    checks = report["checks"][0]
    assert checks["latents_dtype_from_vae"].startswith("torch.float32 (VAE in torch.bfloat16")
    assert checks["latents_dtype_from_sampling"].startswith("torch.float32 (UNet in torch.bfloat16")
    assert all(checks[f"repeat_identical_{s}"] for s in ("plms", "ddim", "dpm++"))
    assert "## Stage 2" in (tmp_path / "gpu_report.md").read_text()
