"""Stage 3, phase `generate`: images from the EEG of one split, resumable and sharded over processes.

For every trial i of the split (the first `max_trials`), `num_images_per_eeg` images seeded from
`seed + i`, written as uint8 PNGs in the authors' naming - `images/test{i}-0.png` the ground truth
at the model's output size, `test{i}-{k}.png` (k >= 1) the generated ones - and, once a trial's files
are all on disk, its record `records/test{i}.json` (image, reference image, seed, and the CLIP-head
embedding of its EEG in `records/test{i}.npy` for the retrieval score). Every file is written
atomically. `generation.json` holds the generation settings and what the model is.

Resume: a trial whose record exists is not generated again; a changed setting (GENERATION_SETTINGS)
is a ConfigError naming the field unless `overwrite=true`. Trials are generated in fixed batches
(batch b = trials [b * batch_size, (b + 1) * batch_size)), so a resumed or sharded run computes
exactly the batches an uninterrupted single-process run computes: the PNGs are byte-identical.

Several processes (Lightning Fabric, or torchrun): batch b goes to rank b mod world_size; each rank
writes its own trials; rank 0 then waits (at most `rank_timeout_s`) until every trial is recorded,
and writes `generation.jsonl` (all records, in order) for the score phase.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from dreamdiffusion.core.errors import CheckpointError, ConfigError, DataError, DreamDiffusionError
from dreamdiffusion.core.files import atomic_path, atomic_write_json, atomic_write_text
from dreamdiffusion.models.clip_embedder import check_clip_path
from dreamdiffusion.models.dreamdiffusion import CONFIG_NAME, DreamDiffusion
from dreamdiffusion.models.pipeline import DEFAULT_STEPS, DreamDiffusionPipeline
from dreamdiffusion.models.sd15 import load_sd15

logger = logging.getLogger(__name__)

# The settings an image depends on; a resumed run must agree on each (or pass overwrite=true).
GENERATION_SETTINGS = ("model", "class_oracle", "oracle_sd_path", "oracle_prompt", "shuffled_labels", "sampler",
                       "num_inference_steps", "eta", "guidance_scale", "null_condition", "seed",
                       "num_images_per_eeg", "split", "data.kind", "data.subject", "data.split_index", "data.eeg_path",
                       "data.splits_path", "data.things_eeg2", "max_trials", "batch_size", "precision", "save_images")
AUTHORS_SELECTION = ("chosen by the authors on the TEST split (best max-over-5-slots accuracy of the first "
                     "25 test trials; docs/method.md, \"Evaluation\") - not a held-out estimate")


# ---------------------------------------------------------------------------------------------
# The class-name oracle: base SD1.5 conditioned on text


@dataclass
class TextCondition:
    context: torch.Tensor  # [B, 77, cross_attention_dim]: CLIP text states, as SD1.5 was trained
    time_embedding: torch.Tensor | None = None


class TextConditionedSD(nn.Module):
    """SD1.5's UNet + VAE conditioned on text, with DreamDiffusion's sampling API (for the pipeline)."""

    def __init__(self, unet: nn.Module, vae: nn.Module, noise_scheduler):
        super().__init__()
        self.unet, self.vae, self.noise_scheduler = unet.eval(), vae.eval(), noise_scheduler
        self.null_context: torch.Tensor | None = None  # [1, 77, D]: the empty prompt's text states
        self.latent_scale_source = "the VAE config"

    vae_scale_factor = property(lambda self: 2 ** (len(self.vae.config.block_out_channels) - 1))
    latent_channels = property(lambda self: self.unet.config.in_channels)
    latent_size = property(lambda self: self.unet.config.sample_size)
    image_size = property(lambda self: self.latent_size * self.vae_scale_factor)
    device = property(lambda self: next(self.unet.parameters()).device)
    dtype = property(lambda self: next(self.unet.parameters()).dtype)

    def denoise(self, noisy_latents, timesteps, condition: TextCondition) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps,
                         encoder_hidden_states=condition.context.to(noisy_latents.dtype)).sample

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def null_condition(self, n: int) -> TextCondition:
        """SD's own unconditional input (the empty prompt), for guidance with null_condition="learned"."""
        if self.null_context is None:
            raise ConfigError("the class oracle's null condition needs the empty prompt's text states")
        return TextCondition(self.null_context.expand(n, -1, -1).to(self.device))


@torch.no_grad()
def text_contexts(text_encoder_path: str, prompts: Sequence[str], device) -> torch.Tensor:
    """CLIP text states [n_prompts, max_length, width] (last hidden state, padded as SD1.5 does)."""


    source = check_clip_path(text_encoder_path)
    local = Path(source).exists()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=local)
        text_model = CLIPTextModel.from_pretrained(source, local_files_only=local).to(device).eval()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"could not load the CLIP text encoder + tokenizer from {source}: {err}") from err
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    return text_model(tokens.input_ids.to(device)).last_hidden_state.float().cpu()


def class_names(path: str | None, wnids: Sequence[str]) -> tuple[list[str], str | None]:
    """Readable class names (json {wnid: name}) for the oracle's prompts, and a note when there are none."""
    if not path:
        return list(wnids), "no class_names_path given: oracle prompts use the WordNet ids"
    file = Path(path)
    if not file.is_file():
        raise DataError(f"class_names_path not found: {file} (expected a json {{wnid: name}})")
    try:
        names = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"class_names_path {file} is not valid JSON: {err}") from err
    missing = [w for w in wnids if w not in names]
    if missing:
        raise DataError(f"{file} has no name for {len(missing)} class(es), e.g. {missing[:3]}")
    return [names[w] for w in wnids], None


# ---------------------------------------------------------------------------------------------
# Loading the generator


def _selection_record(folder: Path) -> str:
    """How the checkpoint was chosen, from the model folder's metadata if it says."""
    for name, key in (("selection.json", None), ("dreamdiffusion.json", "selection")):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            record = data if key is None else data.get(key)
            if record:
                return record if isinstance(record, str) else json.dumps(record, sort_keys=True)
    return "unknown: the model folder records no checkpoint selection (selection.json)"


def training_deviations(model_path: Path) -> list[dict[str, Any]] | None:
    """The deviations stage 2 recorded for a model folder (`training.json`), if any."""
    path = model_path / "training.json"
    if model_path.is_dir() and path.is_file():
        return json.loads(path.read_text()).get("deviations")
    return None


def load_model(path: str | Path, sd_config_dir: str | None):
    """(DreamDiffusion, description of the checkpoint, how it was selected) from our folder or the
    authors' generation checkpoint."""

    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"model not found: {source} (expected a stage-2 save_pretrained folder with "
                              f"{CONFIG_NAME}, or the authors' generation checkpoint .pth)")
    if source.is_dir():
        model = DreamDiffusion.from_pretrained(source)
        return model, f"our save_pretrained folder {source}", _selection_record(source)
    model = DreamDiffusion.from_original_checkpoint(source, sd_config=sd_config_dir)
    return model, f"authors'-format generation checkpoint {source}", AUTHORS_SELECTION


def load_generator(cfg: DictConfig) -> tuple[nn.Module, str, str]:
    """(model with the sampling API, what it is, how its checkpoint was selected)."""
    if not cfg.class_oracle:
        return load_model(cfg.model, cfg.sd_config_dir)

    sd = load_sd15(cfg.oracle_sd_path, cfg.sd_config_dir)
    return TextConditionedSD(sd.unet, sd.vae, sd.noise_scheduler), f"base SD1.5 {cfg.oracle_sd_path} (no EEG)", \
        "not applicable"


def oracle_contexts(cfg: DictConfig, model: TextConditionedSD, wnids: Sequence[str], device,
                    notes: list[str]) -> torch.Tensor:
    """Text states [n_classes, 77, D] of the oracle prompt per class; sets the model's null context
    (the empty prompt, SD's own unconditional input) for guidance."""
    names, note = class_names(cfg.class_names_path, wnids)
    if note:
        notes.append(note)
    prompts = [cfg.oracle_prompt.format(name) for name in names]
    contexts = text_contexts(cfg.oracle_text_encoder_path or cfg.clip_path, [*prompts, ""], device)
    if contexts.shape[-1] != model.unet.config.cross_attention_dim:
        raise ConfigError(f"the text encoder's width {contexts.shape[-1]} does not match the UNet's "
                          f"cross-attention dim {model.unet.config.cross_attention_dim}")
    model.null_context = contexts[-1:]
    return contexts[:-1]


def shuffled_references(labels: Sequence[int], seed: int) -> list[int]:
    """For each trial, a random trial of ANOTHER class (its image becomes the ground truth)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = []
    for label in labels:
        others = np.flatnonzero(labels != label)
        if len(others) == 0:
            raise DataError("shuffled_labels needs trials of at least two classes in the split")
        out.append(int(rng.choice(others)))
    return out


# ---------------------------------------------------------------------------------------------
# Settings and resume


def generation_settings(cfg: DictConfig) -> dict[str, Any]:
    """The values of GENERATION_SETTINGS (the effective number of steps for a null one)."""

    out = {}
    for key in GENERATION_SETTINGS:
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        out[key] = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
    out["num_inference_steps"] = cfg.num_inference_steps or DEFAULT_STEPS[cfg.sampler]
    # THINGS-EEG2's block only when it is the data, and only the fields that shape this split's items
    if cfg.data.kind != "things_eeg2":
        del out["data.things_eeg2"]
    else:
        unused = ("val_concepts", "seed", "average_repetitions_train") if cfg.split == "test" \
            else ("average_repetitions_test",)
        out["data.things_eeg2"] = {k: v for k, v in out["data.things_eeg2"].items() if k not in unused}
    return out


def prepare_output(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Check (or, with `overwrite`, clear) an earlier generation in `out_dir` before any work."""
    header = out_dir / "generation.json"
    if not header.is_file():
        return
    try:
        earlier = json.loads(header.read_text())["settings"]
    except (json.JSONDecodeError, KeyError) as err:
        raise DataError(f"{header} is damaged ({err}); delete {out_dir} or pass overwrite=true") from err
    # a setting the earlier run did not record (an older version's folder) is not compared
    changed = [k for k in settings if k in earlier and earlier[k] != settings[k]]
    # A run that stopped before its first trial (a bad input found after the settings were written)
    # left nothing to protect: its settings are simply replaced.
    if changed and not overwrite and done_trials(out_dir):
        k = changed[0]
        raise ConfigError(f"{out_dir} holds images generated with {k}={earlier.get(k)!r}, not {settings[k]!r}: use "
                          "another output_dir, the same settings to resume, or overwrite=true to start again")
    if changed:
        for sub in ("images", "records", "grids"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
        for name in ("generation.json", "generation.jsonl", "metrics.json", "results.md"):
            (out_dir / name).unlink(missing_ok=True)


def done_trials(out_dir: Path) -> set[int]:
    """Trials whose record is written (their PNGs and embedding were written before it)."""
    records = out_dir / "records"
    if not records.is_dir():
        return set()
    return {int(p.stem[4:]) for p in records.glob("test*.json") if p.stem[4:].isdigit()}


def batches_of_rank(n_trials: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Batch b (trials [b * batch_size, ...)) belongs to rank b mod world."""
    starts = range(0, n_trials, batch_size)
    return [list(range(s, min(s + batch_size, n_trials))) for b, s in enumerate(starts) if b % world == rank]


def wait_for_all(out_dir: Path, n_trials: int, timeout_s: float, poll_s: float = 1.0, progress: bool = True) -> None:
    """Rank 0: wait until every trial is recorded, or stop with a sentence after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    bar = tqdm(total=n_trials, desc="stage 3: all ranks", unit="trial", disable=not progress)
    try:
        while True:
            done = done_trials(out_dir)
            bar.update(len(done) - bar.n)
            if len(done) >= n_trials:
                return
            if time.monotonic() > deadline:
                missing = sorted(set(range(n_trials)) - done)
                raise DreamDiffusionError(
                    f"{len(missing)} trial(s) were not generated within rank_timeout_s={timeout_s:g} s (e.g. trial "
                    f"{missing[0]}): another process has stopped or is far behind; re-run the same command to "
                    "resume (finished trials are kept)")
            time.sleep(poll_s)
    finally:
        bar.close()


def write_jsonl(out_dir: Path, n_trials: int) -> list[dict[str, Any]]:
    """`generation.jsonl`: every trial's record, in order (rank 0, once all are done)."""
    records = [json.loads((out_dir / "records" / f"test{i}.json").read_text()) for i in range(n_trials)]
    atomic_write_text(out_dir / "generation.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return records


# ---------------------------------------------------------------------------------------------
# Generating


def save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def ground_truth_uint8(image: torch.Tensor) -> np.ndarray:
    """A dataset image [3, S, S] in [-1, 1] -> uint8 [S, S, 3] (what test{i}-0.png holds)."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


@dataclass
class GenerationJob:
    """What one process needs to generate its trials."""

    cfg: DictConfig  # resolved stage-3 config
    out_dir: Path
    model: nn.Module
    pipe: DreamDiffusionPipeline
    dataset: Any  # ImageNetEEGDataset at the model's image size
    references: list[int]  # per trial: the trial whose image is the ground truth
    contexts: torch.Tensor | None  # the oracle's text states per class
    sampling: dict[str, Any]

    def run(self, batches: list[list[int]], progress: bool = True) -> int:
        """Generate the unrecorded trials of `batches`; returns how many trials it generated."""
        done = done_trials(self.out_dir)
        todo = [b for b in batches if not set(b) <= done]
        n_mine = sum(len(b) for b in batches)
        bar = tqdm(total=n_mine, initial=n_mine - sum(len(b) for b in todo), desc="stage 3: generate",
                   unit="trial", disable=not progress)
        generated = 0
        for indices in todo:
            self._batch(indices, done)
            bar.update(sum(i not in done for i in indices))
            generated += sum(i not in done for i in indices)
        bar.close()
        return generated

    @torch.no_grad()
    def _batch(self, indices: list[int], done: set[int]) -> None:
        cfg, model = self.cfg, self.model
        items = [self.dataset[i] for i in indices]
        refs = [items[k] if self.references[i] == i else self.dataset[self.references[i]] for k, i in enumerate(indices)]
        eeg = torch.stack([it["eeg"] for it in items]).to(model.device, model.dtype)
        # trial i's images depend only on seed + i (and on the batch it is computed in, which is fixed)
        generators = [torch.Generator().manual_seed(cfg.seed + i) for i in indices]
        if cfg.class_oracle:
            condition = TextCondition(self.contexts[[it["label"] for it in items]].to(model.device))
            images = self.pipe(condition=condition, generator=generators, output_type="np", **self.sampling).images
            embeddings = None
        else:
            condition = model.encode_eeg(eeg)
            embeddings = condition.clip_embedding.float().cpu().numpy()
            images = (self.pipe(condition=condition, generator=generators, output_type="np", **self.sampling).images
                      if cfg.save_images else None)
        for k, (i, item, ref) in enumerate(zip(indices, items, refs)):
            if i in done:
                continue
            self._write_trial(i, item, ref, None if images is None else images[k],
                              None if embeddings is None else embeddings[k])

    def _write_trial(self, i: int, item: dict, ref: dict, images: np.ndarray | None, embedding) -> None:
        folder = self.out_dir / "images"
        if images is not None:  # save_images=false: a retrieval-only run writes no images
            save_png(folder / f"test{i}-0.png", ground_truth_uint8(ref["image"]))
            for slot, image in enumerate(images, start=1):
                save_png(folder / f"test{i}-{slot}.png", image)
        if embedding is not None:
            with atomic_path(self.out_dir / "records" / f"test{i}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, embedding.astype(np.float32))
        record = {"index": i, "image_name": item["image_name"], "wnid": item["wnid"], "label": item["label"],
                  "reference_image": ref["image_name"], "reference_wnid": ref["wnid"],
                  "reference_path": str(self.dataset.image_path(self.references[i])), "seed": self.cfg.seed + i,
                  "eeg_embedding": f"test{i}.npy" if embedding is not None else None}
        atomic_write_json(self.out_dir / "records" / f"test{i}.json", record)  # last: the trial is done


def generation_header(cfg: DictConfig, model: nn.Module, model_info: str, selection: str, n_trials: int,
                      n_in_split: int, dtype: torch.dtype, device) -> dict[str, Any]:
    """What `generation.json` holds: the settings (checked on resume) and what was generated with what."""
    return {
        "settings": generation_settings(cfg),
        "model": model_info,
        "checkpoint_selection": selection,
        "latent_scale": f"{float(model.vae.config.scaling_factor):g} from {model.latent_scale_source}",
        "image_size": model.image_size,
        "n_trials": n_trials,
        "n_trials_in_split": n_in_split,
        "precision": str(dtype).replace("torch.", ""),
        "device": str(device),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
    }
