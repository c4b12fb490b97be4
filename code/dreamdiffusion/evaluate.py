"""Stage 3: generate images from the EEG of one split and score them with the paper's protocol.

`run_stage3(cfg)` (cfg: a `Stage3Config`):
  1. loads the model (our `save_pretrained` folder, or an authors' generation checkpoint `.pth`),
     the split's trials, the classifier and the other metric networks - all from local files;
  2. generates `num_images_per_eeg` images per trial (trial i seeded with `seed + i`, so images do
     not depend on `batch_size` or `max_trials`), saves `images/test{i}-{k}.png` (k = 0 the
     ground truth, as the authors) and `grids/grid-XXX.png`;
  3. scores every generated image against its trial's ground truth (`Evaluator`): the n-way top-k
     accuracy with the classifier's arg-max on the ground truth as the reference class, MSE, PCC,
     SSIM, LPIPS, CLIP image similarity, FID / IS / KID, and the EEG-side CLIP retrieval accuracy;
  4. writes `metrics.json` (protocol, summaries with bootstrap intervals, per-trial scores) and
     `results.md` (the table in the paper's form + the protocol).

Controls (REFERENCE section 5): `shuffled_labels` pairs each trial with a random image of another
class as its ground truth (and reference class); `class_oracle` ignores the EEG and conditions the
base SD1.5 UNet on the CLIP text states of "a photo of a <class name>".
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from . import metrics as M
from .config import resolve_path, save_config, to_container
from .errors import CheckpointError, ConfigError, DataError
from .io import atomic_path, atomic_write_json, atomic_write_text
from .pipeline import DEFAULT_STEPS, NULL_CONDITIONS, SAMPLERS, DreamDiffusionPipeline

logger = logging.getLogger(__name__)

PAIRWISE_METRICS = ("mse", "pcc", "ssim", "lpips", "clip_similarity")
GENERATION_METRICS = ("n_way", *PAIRWISE_METRICS, "fid")
KNOWN_METRICS = (*GENERATION_METRICS, "retrieval")
LOWER_IS_BETTER = {"mse", "lpips", "fid", "kid"}
AUTHORS_SELECTION = ("chosen by the authors on the TEST split (best max-over-5-slots accuracy of the first "
                     "25 test trials; REFERENCE section 4) - not a held-out estimate")


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
    from transformers import CLIPTextModel, CLIPTokenizer

    from .clip_embedder import check_clip_path

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


# ---------------------------------------------------------------------------------------------
# Scoring


class Evaluator:
    """Accumulates per-image scores over batches; `compute` summarises them.

    metrics: names from KNOWN_METRICS. Networks not given make their metric "skipped" (with the
    reason in `skipped`), never silently zero. classifier: images [-1, 1] -> probabilities.
    """

    def __init__(self, metrics: Sequence[str], classifier: nn.Module | None = None,
                 clip_model: nn.Module | None = None, lpips: nn.Module | None = None,
                 fid_features: nn.Module | None = None, fid_logits: nn.Module | None = None,
                 n_way: int = 50, top_k: int = 1, n_way_trials: int | None = None, seed: int = 0,
                 kid_subset_size: int = 50, skipped: dict[str, str] | None = None):
        unknown = sorted(set(metrics) - set(KNOWN_METRICS))
        if unknown:
            raise ConfigError(f"unknown metric(s) {unknown}; known: {', '.join(KNOWN_METRICS)}")
        self.skipped = dict(skipped or {})
        needs = {"n_way": classifier, "lpips": lpips, "clip_similarity": clip_model, "fid": fid_features,
                 "retrieval": clip_model}
        for name in metrics:
            if name in needs and needs[name] is None and name not in self.skipped:
                raise ConfigError(f"metric '{name}' was asked for but its network was not given")
        self.metrics = [m for m in metrics if m not in self.skipped]
        self.classifier, self.clip_model, self.lpips = classifier, clip_model, lpips
        self.n_way, self.top_k, self.n_way_trials = n_way, top_k, n_way_trials
        self.generator = torch.Generator().manual_seed(seed)  # only used by the sampled n-way estimate
        self.scores: dict[str, list[np.ndarray]] = {m: [] for m in self.metrics if m in GENERATION_METRICS}
        self.scores.pop("fid", None)
        if "n_way" in self.metrics:
            self.scores["top1_agreement"] = []
        self.reference_class: list[int] = []
        self.distribution = (M.DistributionMetrics(fid_features, fid_logits, kid_subset_size)
                             if "fid" in self.metrics else None)
        self.retrieval_eeg: list[torch.Tensor] = []
        self.retrieval_images: list[torch.Tensor] = []
        self.retrieval_ids: list[str] = []
        self.retrieval_scores: np.ndarray | None = None

    @torch.no_grad()
    def update(self, reference: torch.Tensor, generated: torch.Tensor) -> None:
        """reference [B, 3, H, W], generated [B, K, 3, H, W], both in [-1, 1]."""
        n_trials, n_slots = generated.shape[:2]
        flat = generated.reshape(n_trials * n_slots, *generated.shape[2:])
        repeated = reference.repeat_interleave(n_slots, dim=0)  # [B*K, 3, H, W], trial-major like `flat`

        def per_slot(values) -> np.ndarray:
            return np.asarray(values, dtype=np.float64).reshape(n_trials, n_slots)

        if "n_way" in self.metrics:
            ref_class = self._classify(reference).argmax(dim=1)  # [B]
            probs = self._classify(flat)  # [B*K, n_classes]
            ref_flat = ref_class.repeat_interleave(n_slots)
            acc = M.n_way_top_k_accuracy(probs, ref_flat, self.n_way, self.top_k, self.n_way_trials,
                                         self.generator)
            self.scores["n_way"].append(per_slot(acc))
            self.scores["top1_agreement"].append(per_slot(probs.argmax(dim=1) == ref_flat))
            self.reference_class.extend(ref_class.tolist())
        gen_u8, ref_u8 = M.to_uint8_hwc(flat), M.to_uint8_hwc(repeated)
        for name, fn in (("mse", M.mse), ("pcc", M.pcc), ("ssim", M.ssim)):
            if name in self.metrics:
                self.scores[name].append(per_slot(fn(gen_u8, ref_u8)))
        if "lpips" in self.metrics:
            device = next(self.lpips.parameters()).device
            self.scores["lpips"].append(per_slot(self.lpips(flat.to(device), repeated.to(device)).cpu()))
        if "clip_similarity" in self.metrics:
            sims = M.cosine_similarity(M.clip_image_embeddings(self.clip_model, flat),
                                       M.clip_image_embeddings(self.clip_model, reference).repeat_interleave(n_slots, 0))
            self.scores["clip_similarity"].append(per_slot(sims))
        if self.distribution is not None:
            self.distribution.update(torch.from_numpy(gen_u8).permute(0, 3, 1, 2).contiguous(), real=False)
            self.distribution.update(torch.from_numpy(M.to_uint8_hwc(reference)).permute(0, 3, 1, 2).contiguous(),
                                     real=True)

    def _classify(self, images: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Classifier probabilities on the CPU, in chunks (ViT-H at 518 px is memory-hungry)."""
        return torch.cat([self.classifier(images[i : i + chunk]).float().cpu() for i in range(0, len(images), chunk)])

    def update_retrieval(self, eeg_embeddings: torch.Tensor, image_embeddings: torch.Tensor,
                         image_ids: Sequence[str]) -> None:
        """eeg_embeddings: the CLIP head's output [B, D]; image_embeddings: CLIP image embeds [B, D]."""
        self.retrieval_eeg.append(eeg_embeddings.detach().float().cpu())
        self.retrieval_images.append(image_embeddings.detach().float().cpu())
        self.retrieval_ids.extend(image_ids)

    def per_image(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(chunks) for name, chunks in self.scores.items() if chunks}

    def compute(self, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name, values in self.per_image().items():
            results[name] = M.summarize(values, n_bootstrap, seed)
        if self.distribution is not None and self.distribution.n_fake:
            results["fid"] = self.distribution.compute()
        if "retrieval" in self.metrics and self.retrieval_ids:
            acc, used = M.retrieval_accuracy(torch.cat(self.retrieval_eeg), torch.cat(self.retrieval_images),
                                             self.retrieval_ids, self.n_way, self.top_k)
            self.retrieval_scores = acc  # per trial, for metrics.json
            results["retrieval"] = {**M.summarize(acc, n_bootstrap, seed), "n_way": used,
                                    "chance": min(self.top_k, used) / used}
        return results


# ---------------------------------------------------------------------------------------------
# Loading


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{name}'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is available (use device=auto or cpu)")
    return device


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "32": torch.float32, "fp16": torch.float16, "16": torch.float16,
             "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in table:
        raise ConfigError(f"precision must be auto, fp32, fp16 or bf16, got '{precision}'")
    return table[precision]


def load_model(path: str, sd_config_dir: str):
    """(DreamDiffusion, description of the checkpoint, how it was selected)."""
    from .model import CONFIG_NAME, DreamDiffusion

    source = resolve_path(path)
    if source is None or not source.exists():
        raise CheckpointError(f"model not found: {source} (expected a stage-2 save_pretrained folder with "
                              f"{CONFIG_NAME}, or the authors' generation checkpoint .pth)")
    if source.is_dir():
        model = DreamDiffusion.from_pretrained(source)
        return model, f"our save_pretrained folder {source}", _selection_record(source)
    model = DreamDiffusion.from_original_checkpoint(source, sd_config=resolve_path(sd_config_dir))
    return model, f"authors'-format generation checkpoint {source}", AUTHORS_SELECTION


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


def _class_names(path: str | None, wnids: Sequence[str]) -> tuple[list[str], str | None]:
    if not path:
        return list(wnids), "no class_names_path given: oracle prompts use the WordNet ids"
    file = resolve_path(path)
    if not file.is_file():
        raise DataError(f"class_names_path not found: {file} (expected a json {{wnid: name}})")
    names = json.loads(file.read_text())
    missing = [w for w in wnids if w not in names]
    if missing:
        raise DataError(f"{file} has no name for {len(missing)} class(es), e.g. {missing[:3]}")
    return [names[w] for w in wnids], None


def check_config(cfg) -> None:
    if cfg.sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got '{cfg.sampler}'")
    if cfg.split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got '{cfg.split}'")
    for name in ("num_images_per_eeg", "batch_size", "n_grid_trials", "num_inference_steps"):
        if cfg[name] is not None and cfg[name] < 1:
            raise ConfigError(f"{name} must be >= 1, got {cfg[name]}")
    if cfg.max_trials is not None and cfg.max_trials < 1:
        raise ConfigError(f"max_trials must be >= 1 or null (every trial), got {cfg.max_trials}")
    unknown = sorted(set(cfg.metrics) - set(KNOWN_METRICS))
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown} in `metrics`; known: {', '.join(KNOWN_METRICS)}")
    if cfg.null_condition not in NULL_CONDITIONS:
        raise ConfigError(f"null_condition must be one of {NULL_CONDITIONS}, got '{cfg.null_condition}'")
    if cfg.class_oracle and cfg.shuffled_labels:
        raise ConfigError("class_oracle and shuffled_labels are separate controls: run them one at a time")
    if cfg.n_way_trials is not None and cfg.n_way_trials < 1:
        raise ConfigError(f"n_way_trials must be >= 1 or null (exact), got {cfg.n_way_trials}")


def _shuffled_references(labels: Sequence[int], seed: int) -> list[int]:
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
# Writing


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """rows: per trial, uint8 [1 + K, H, W, 3] (ground truth first) -> one uint8 image."""
    n_cols, h, w = rows[0].shape[:3]
    grid = np.full((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            grid[top : top + h, left : left + w] = image
    return grid


def _fmt(summary: dict | None, key: str = "mean", percent: bool = False, digits: int = 3) -> str:
    if summary is None:
        return "–"
    value, ci = summary[key], summary.get(f"{key}_ci95")
    scale, unit = (100, "%") if percent else (1, "")
    text = f"{value * scale:.{1 if percent else digits}f}{unit}"
    if ci is not None and ci[0] != ci[1]:
        text += f" [{ci[0] * scale:.{1 if percent else digits}f}, {ci[1] * scale:.{1 if percent else digits}f}]"
    return text


def results_markdown(report: dict) -> str:
    """The paper-style table and the protocol, from a metrics.json dict."""
    p, r = report["protocol"], report["metrics"]
    n_way = p["n_way"]
    fid = r.get("fid")
    head = (f"| Method | {n_way}-way top-{p['top_k']} (mean over {p['num_images_per_eeg']} slots) | "
            f"{n_way}-way top-{p['top_k']} (best slot) | IS | FID | SSIM | PCC | MSE | LPIPS | CLIP sim. | "
            f"EEG→image retrieval |")
    row = (f"| {p['method']} | {_fmt(r.get('n_way'), percent=True)} | "
           f"{_fmt(r.get('n_way'), 'best_slot', percent=True)} | "
           f"{'–' if fid is None else format(fid['is_mean'], '.2f')} | "
           f"{'–' if fid is None else format(fid['fid'], '.1f')} | "
           f"{_fmt(r.get('ssim'))} | {_fmt(r.get('pcc'))} | {_fmt(r.get('mse'), digits=4)} | "
           f"{_fmt(r.get('lpips'))} | {_fmt(r.get('clip_similarity'))} | "
           f"{_fmt(r.get('retrieval'), percent=True)} |")
    paper = "| DreamDiffusion, as reported in the paper (subject 4) | 45.8% | – | – | – | – | – | – | – | – | – |"
    lines = [f"# Stage 3 results: {p['method']}", "", head, "|" + "---|" * 11, row]
    if p["n_way"] == 50 and p["top_k"] == 1:
        lines.append(paper)
    lines += ["", "Means over trials; brackets: bootstrap 95% interval over trials "
              f"({p['bootstrap_samples']} resamples, seed {p['seed']}). \"Best slot\" is the highest of the "
              f"{p['num_images_per_eeg']} per-slot means (the paper's \"max\"), an optimistic selection.", ""]
    if "n_way" in r:
        slots = ", ".join(f"{v * 100:.1f}%" for v in r["n_way"]["per_slot"])
        lines.append(f"Per-slot {n_way}-way top-{p['top_k']}: {slots}. Chance: {p['top_k'] / n_way * 100:.1f}%. "
                     f"Classifier top-1 agreement with the reference class (1 of "
                     f"{p.get('n_classes', '?')}): {_fmt(r.get('top1_agreement'), percent=True)}.")
    if "retrieval" in r:
        lines.append(f"EEG→image retrieval: {r['retrieval']['n_way']}-way among the split's distinct images, "
                     f"chance {r['retrieval']['chance'] * 100:.1f}% (the CLIP head's embedding vs CLIP "
                     "image embeddings; no generation involved).")
    if fid is not None:
        lines.append(f"FID/IS/KID over {p['n_generated_images']} generated vs {p['n_trials']} ground-truth "
                     f"images (KID {fid['kid_mean']:.4f} ± {fid['kid_std']:.4f}); with few images these "
                     "are strongly biased and only comparable at equal counts.")
    lines += ["", "## Protocol", ""]
    for key, value in p.items():
        if key != "method":
            lines.append(f"- **{key}**: {value}")
    if report.get("skipped"):
        lines += ["", "## Skipped metrics", ""]
        lines += [f"- **{k}**: {v}" for k, v in report["skipped"].items()]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The stage


METRIC_NETWORKS = {"n_way": "classifier", "clip_similarity": "clip_model", "retrieval": "clip_model",
                   "lpips": "lpips", "fid": "fid_features"}


def _metric_networks(cfg, device: torch.device, skipped: dict[str, str], given: dict[str, Any]) -> dict[str, Any]:
    """The networks of the configured metrics: those `given`, the rest from local files. A metric
    whose optional weights are not configured is recorded in `skipped` with the reason."""
    from .classifier import load_classifier
    from .clip_embedder import load_clip_image_encoder

    nets: dict[str, Any] = dict(given)
    wanted = {m for m in cfg.metrics if m not in skipped and METRIC_NETWORKS.get(m) not in given}
    if "n_way" in wanted:
        weights = resolve_path(cfg.classifier_weights) if cfg.classifier_weights else None
        spec = cfg.classifier if ":" in cfg.classifier else str(resolve_path(cfg.classifier))
        nets["classifier"] = load_classifier(spec, weights).to(device)
    if wanted & {"clip_similarity", "retrieval"}:
        if cfg.clip_path is None:
            skipped.update({name: "no clip_path given" for name in wanted & {"clip_similarity", "retrieval"}})
        else:
            nets["clip_model"] = load_clip_image_encoder(cfg.clip_path).to(device)
    if "lpips" in wanted:
        if cfg.lpips_weights is None:
            skipped["lpips"] = "no lpips_weights given (torchvision's alexnet-owt-7be5be79.pth)"
        else:
            nets["lpips"] = M.LPIPS(resolve_path(cfg.lpips_weights)).to(device)
    if "fid" in wanted:
        if cfg.fid_feature_weights is None:
            skipped["fid"] = "no fid_feature_weights given (weights-inception-2015-12-05-6726825d.pth)"
        else:
            pool, logits = M.inception_feature_modules(resolve_path(cfg.fid_feature_weights))
            nets["fid_features"], nets["fid_logits"] = pool.to(device), logits.to(device)
    return nets


def _load_generator(cfg, skipped: dict[str, str]) -> tuple[nn.Module, str, str]:
    """(model with the sampling API, what it is, how its checkpoint was selected)."""
    if not cfg.class_oracle:
        return load_model(cfg.model, cfg.sd_config_dir)
    from .sd15 import load_sd15

    sd = load_sd15(cfg.oracle_sd_path, cfg.sd_config_dir)
    if "retrieval" in cfg.metrics:
        skipped["retrieval"] = "not applicable to the class-name oracle (it uses no EEG)"
    model = TextConditionedSD(sd.unet, sd.vae, sd.noise_scheduler)
    return model, f"base SD1.5 {resolve_path(cfg.oracle_sd_path)} (no EEG)", "not applicable"


def _oracle_contexts(cfg, model: TextConditionedSD, wnids: Sequence[str], device, notes: list[str]) -> torch.Tensor:
    """Text states [n_classes, 77, D] of the oracle prompt per class; sets the model's null context
    (the empty prompt, SD's own unconditional input) for guidance."""
    names, note = _class_names(cfg.class_names_path, wnids)
    if note:
        notes.append(note)
    prompts = [cfg.oracle_prompt.format(name) for name in names]
    contexts = text_contexts(cfg.oracle_text_encoder_path or cfg.clip_path, [*prompts, ""], device)
    if contexts.shape[-1] != model.unet.config.cross_attention_dim:
        raise ConfigError(f"the text encoder's width {contexts.shape[-1]} does not match the UNet's "
                          f"cross-attention dim {model.unet.config.cross_attention_dim}")
    model.null_context = contexts[-1:]
    return contexts[:-1]


class ImageWriter:
    """`images/test{i}-{k}.png` (k = 0 the ground truth) and `grids/grid-NNN.png` of
    `rows_per_grid` trials each (ground truth | samples), all written atomically."""

    def __init__(self, out_dir: Path, rows_per_grid: int):
        self.out_dir, self.rows_per_grid = out_dir, rows_per_grid
        self.rows: list[np.ndarray] = []
        self.n_grids = 0

    def add(self, index: int, row: np.ndarray) -> None:
        """row: uint8 [1 + K, H, W, 3], the ground truth first."""
        for slot, image in enumerate(row):
            _save_png(self.out_dir / "images" / f"test{index}-{slot}.png", image)
        self.rows.append(row)
        if len(self.rows) == self.rows_per_grid:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            _save_png(self.out_dir / "grids" / f"grid-{self.n_grids:03d}.png", _grid(self.rows))
            self.rows, self.n_grids = [], self.n_grids + 1


def _protocol(cfg, model, model_info: str, selection: str, n_trials: int, n_in_split: int,
              generated: bool, steps: int, n_classes: int | None, device, dtype) -> dict[str, Any]:
    method = ("class-name oracle: base SD1.5 on \"" + cfg.oracle_prompt.format("<class>") + "\""
              if cfg.class_oracle else "DreamDiffusion")
    if cfg.shuffled_labels:
        method += " + shuffled-labels control"
    n_way_mode = ("exact expectation (closed form)" if cfg.n_way_trials is None else
                  f"sampled: {cfg.n_way_trials} draws of {cfg.n_way - 1} distractors per image, seed {cfg.seed}")
    return {
        "method": method,
        "model": model_info,
        "checkpoint_selection": selection,
        "split": f"{cfg.split} (split_index {cfg.data.split_index} of {resolve_path(cfg.data.splits_path)})",
        "subject": cfg.data.subject,
        "eeg_path": str(resolve_path(cfg.data.eeg_path)),
        "n_trials": n_trials,
        "n_trials_in_split": n_in_split,
        "num_images_per_eeg": cfg.num_images_per_eeg,
        "n_generated_images": n_trials * cfg.num_images_per_eeg if generated else 0,
        "image_size": model.image_size,
        "sampler": cfg.sampler,
        "num_inference_steps": steps,
        "eta": cfg.eta,
        "guidance_scale": cfg.guidance_scale,
        "null_condition": cfg.null_condition if cfg.guidance_scale != 1 else "unused (no guidance)",
        "seed": cfg.seed,
        "seeding": "trial i: torch.Generator().manual_seed(seed + i) -> one CPU seed per sample slot",
        "classifier": f"{cfg.classifier} (weights: {cfg.classifier_weights})" if "n_way" in cfg.metrics else None,
        "n_classes": n_classes,
        "reference_class": "the classifier's arg-max on the ground-truth image (k = 0)",
        "n_way": cfg.n_way,
        "top_k": cfg.top_k,
        "n_way_estimate": n_way_mode,
        "ties": "a distractor scoring exactly the reference's probability counts as beating it",
        "bootstrap_samples": cfg.bootstrap_samples,
        "shuffled_labels": cfg.shuffled_labels,
        "class_oracle": cfg.class_oracle,
        "device": str(device),
        "precision": str(dtype).replace("torch.", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
    }


def run_stage3(cfg, extra_networks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate and evaluate as configured; returns the metrics.json dict.

    extra_networks: metric networks given directly (keys of `Evaluator`: classifier, clip_model,
    lpips, fid_features, fid_logits), e.g. tiny ones in tests; they take precedence over the config.
    """
    from .dataset import ImageNetEEGDataset

    check_config(cfg)
    out_dir = resolve_path(cfg.output_dir)
    device = _device(cfg.device)
    dtype = _dtype(cfg.precision, device)
    steps = cfg.num_inference_steps or DEFAULT_STEPS[cfg.sampler]
    notes: list[str] = []
    skipped: dict[str, str] = {}

    # 1. the generator: DreamDiffusion, or base SD1.5 + text for the class-name oracle
    model, model_info, selection = _load_generator(cfg, skipped)
    model = model.to(device=device, dtype=dtype).eval()
    pipe = DreamDiffusionPipeline(model)
    pipe.set_progress_bar_config(leave=False, desc="denoising")

    # 2. the split's trials, images at the generator's output size
    data_cfg = OmegaConf.merge(cfg.data, {"image_size": model.image_size})
    if model.image_size != cfg.data.image_size:
        notes.append(f"ground-truth images loaded at the model's output size {model.image_size} px "
                     f"(data.image_size was {cfg.data.image_size})")
    if cfg.data.image_dir is None:
        raise ConfigError("stage 3 needs the ground-truth images: set data.image_dir")
    dataset = ImageNetEEGDataset.from_config(data_cfg, split=cfg.split)
    n_trials = len(dataset) if cfg.max_trials is None else min(cfg.max_trials, len(dataset))
    references = _shuffled_references(dataset.labels, cfg.seed) if cfg.shuffled_labels else list(range(len(dataset)))
    contexts = _oracle_contexts(cfg, model, dataset.wnids, device, notes) if cfg.class_oracle else None

    # 3. the metric networks
    nets = _metric_networks(cfg, device, skipped, extra_networks or {})
    classifier = nets.get("classifier")
    n_classes = getattr(classifier, "n_classes", None)
    if "n_way" in cfg.metrics and n_classes is not None and not cfg.top_k <= cfg.n_way <= n_classes:
        raise ConfigError(f"n_way={cfg.n_way}, top_k={cfg.top_k}: need top_k <= n_way <= the classifier's "
                          f"{n_classes} classes")
    clip_model = nets.get("clip_model")
    if "retrieval" in cfg.metrics and clip_model is not None and not cfg.class_oracle:
        head_dim = model.conditioner.clip_head[1].out_features
        clip_dim = getattr(getattr(clip_model, "config", None), "projection_dim", head_dim)
        if head_dim != clip_dim:
            raise ConfigError(
                f"metric 'retrieval' compares the model's CLIP head ({head_dim} values) with the image "
                f"embeddings of the CLIP at clip_path={cfg.clip_path} ({clip_dim} values): use the CLIP the "
                "model was trained against, or drop 'retrieval' from metrics"
            )
    evaluator = Evaluator(cfg.metrics, classifier=classifier, clip_model=clip_model,
                          lpips=nets.get("lpips"), fid_features=nets.get("fid_features"),
                          fid_logits=nets.get("fid_logits"), n_way=cfg.n_way, top_k=cfg.top_k,
                          n_way_trials=cfg.n_way_trials, seed=cfg.seed, kid_subset_size=cfg.kid_subset_size,
                          skipped=skipped)
    generate = cfg.save_images or any(m in GENERATION_METRICS for m in evaluator.metrics)
    sampling = dict(num_images_per_eeg=cfg.num_images_per_eeg, num_inference_steps=steps, sampler=cfg.sampler,
                    eta=cfg.eta, guidance_scale=cfg.guidance_scale, null_condition=cfg.null_condition)

    # 4. generate, save and score, batch by batch
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    writer = ImageWriter(out_dir, cfg.n_grid_trials)
    trials: list[dict[str, Any]] = []
    for start in tqdm(range(0, n_trials, cfg.batch_size), desc="stage 3", unit="batch"):
        indices = list(range(start, min(start + cfg.batch_size, n_trials)))
        items = [dataset[i] for i in indices]
        ref_items = [items[k] if references[i] == i else dataset[references[i]] for k, i in enumerate(indices)]
        reference = torch.stack([it["image"] for it in ref_items])  # [B, 3, S, S] in [-1, 1]
        eeg = torch.stack([it["eeg"] for it in items])  # [B, n_channels, n_times]
        if "retrieval" in evaluator.metrics:
            with torch.no_grad():
                eeg_embeds = model.encode_eeg(eeg.to(device, dtype)).clip_embedding
            evaluator.update_retrieval(eeg_embeds, M.clip_image_embeddings(nets["clip_model"], reference),
                                       [it["image_name"] for it in ref_items])
        if generate:
            # trial i's images depend only on seed + i: not on batch_size or max_trials
            generators = [torch.Generator().manual_seed(cfg.seed + i) for i in indices]
            if cfg.class_oracle:
                condition = TextCondition(contexts[[it["label"] for it in items]].to(device))
                images = pipe(condition=condition, generator=generators, **sampling).images
            else:
                images = pipe(eeg, generator=generators, **sampling).images  # [B, K, 3, S, S]
            evaluator.update(reference, images)
            if cfg.save_images:
                ref_u8 = M.to_uint8_hwc(reference)
                gen_u8 = M.to_uint8_hwc(images.flatten(0, 1)).reshape(*images.shape[:2], *ref_u8.shape[1:])
                for k, i in enumerate(indices):
                    writer.add(i, np.concatenate([ref_u8[k : k + 1], gen_u8[k]]))
        trials += [{"index": i, "image_name": it["image_name"], "wnid": it["wnid"],
                    "reference_image": ref["image_name"], "reference_wnid": ref["wnid"], "seed": cfg.seed + i}
                   for i, it, ref in zip(indices, items, ref_items)]
    writer.flush()

    # 5. summaries, per-trial scores, metrics.json and results.md
    results = evaluator.compute(cfg.bootstrap_samples, cfg.seed)
    names = getattr(classifier, "class_names", None)
    for t, ref in enumerate(evaluator.reference_class):
        trials[t]["reference_class"] = ref
        if names:
            trials[t]["reference_class_name"] = names[ref]
    for name, values in evaluator.per_image().items():
        for t, trial in enumerate(trials):
            trial[name] = values[t].tolist()
    if evaluator.retrieval_scores is not None:
        for trial, value in zip(trials, evaluator.retrieval_scores):
            trial["retrieval"] = float(value)
    protocol = _protocol(cfg, model, model_info, selection, n_trials, len(dataset), generate, steps, n_classes,
                         device, dtype)
    report = {"protocol": protocol, "metrics": results, "skipped": skipped, "notes": notes,
              "config": to_container(cfg), "trials": trials}
    atomic_write_json(out_dir / "metrics.json", report)
    atomic_write_text(out_dir / "results.md", results_markdown(report))
    logger.info("stage 3: wrote %s and %s", out_dir / "metrics.json", out_dir / "results.md")
    return report
