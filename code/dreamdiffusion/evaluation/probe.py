"""Does stage-1 pretraining give useful EEG features? Linear and k-NN probes of the frozen encoder.

The standard self-supervised answer (MAE, He et al. 2022, section 4): freeze the encoder, pool its
tokens into one vector per trial and fit a simple classifier of the ImageNet-EEG class on top. The
same probes run on two references, so the encoder's figure has something to be compared with:
  - `encoder`: the given (pretrained) encoder;
  - `random_encoder`: the same architecture (its `config`) freshly initialised with a fixed seed -
    what the architecture alone gives, without pretraining;
  - `raw_eeg`: the windowed, interpolated EEG itself, average-pooled along time (`raw_eeg_features`).

Features. Encoder: `encoder(eeg)` -> tokens [N, L, D] (after the final LayerNorm, what stage 2
consumes), mean over the L tokens -> [N, D]; eval mode, no gradient. Raw EEG: see `raw_eeg_features`.

Probes. Features are standardised with the training split's mean and standard deviation.
  - linear: scikit-learn's multinomial `LogisticRegression` (lbfgs, L2), one fit on the training
    split per C in `LINEAR_PROBE_CS`; C is the one with the highest val accuracy, ties going to the
    smaller C (stronger regularisation). The model fitted on train alone is scored on val and test.
  - k-NN: scikit-learn's `KNeighborsClassifier` (cosine distance, uniform vote), k from `KNN_KS`
    chosen the same way, ties going to the larger k (the smoother classifier).
Val accuracy is the selection criterion, so it is optimistic; test accuracy is the honest figure.

Intervals: the 95% Wilson score interval of a binomial proportion (scipy's `binomtest`), treating
the split's trials as independent Bernoulli draws. Closed form, so deterministic and free, and
unlike the normal (Wald) interval it stays inside [0, 1] and keeps its coverage near chance or near
100%, where small splits land. It describes the sampling of the evaluation trials only, not the
variation from the training split or the hyper-parameter choice.

`python -m dreamdiffusion.evaluation.probe --encoder PATH --eeg FILE --splits FILE --subject 4` runs the six
probes (3 feature kinds x 2 probes) on the train/val/test splits and writes probe.json + probe.md.
`quick_probe` is the linear probe's val accuracy alone, cheap enough to monitor stage-1 training.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset

from dreamdiffusion.core.devices import resolve_device
from dreamdiffusion.core.errors import ConfigError, DataError, run_cli
from dreamdiffusion.core.files import atomic_write_json, atomic_write_text
from dreamdiffusion.dataset import ImageNetEEGDataset
from dreamdiffusion.models.mae import EEGEncoder, build_encoder, load_eeg_encoder

# Inverse L2 strengths tried by the linear probe: a decade grid wide enough for ~1000 standardised
# features and ~1000 training trials (the optimum on ImageNet-EEG sits well inside it).
LINEAR_PROBE_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# The monitor's grid: three fits, around where the full grid's optimum usually lands.
QUICK_PROBE_CS = (1e-3, 1e-2, 1e-1)
# Neighbour counts tried by the k-NN probe (those above the training-set size are skipped).
KNN_KS = (1, 3, 5, 10, 20, 50)
KNN_METRIC = "cosine"
# lbfgs iterations per fit; a fit that stops at this bound is listed under "not_converged".
LOGREG_MAX_ITER = 1000
CONFIDENCE = 0.95
RANDOM_ENCODER_SEED = 0
# Raw-EEG feature width when there is no encoder to match: the paper's encoder width.
RAW_FEATURES_DEFAULT = 1024
BATCH_SIZE = 64
SPLITS = ("train", "val", "test")
FEATURE_KINDS = ("encoder", "random_encoder", "raw_eeg")
REPORT_FORMAT = "dreamdiffusion.probe.v1"

EEGSource = Dataset | np.ndarray | torch.Tensor


# ---------------------------------------------------------------------------------------------
# Features


def _stack_eeg(items: list[dict[str, Any]]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(item["eeg"]) for item in items])


def _eeg_batches(source: EEGSource, batch_size: int) -> Iterator[torch.Tensor]:
    """float32 batches [b, C, T] from a dataset of items with `eeg` [C, T], or from an array [N, C, T]."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        eeg = torch.as_tensor(source)
        if eeg.ndim != 3:
            raise ConfigError(f"EEG must be [N, channels, times], got shape {tuple(eeg.shape)}")
        yield from (chunk.float() for chunk in eeg.split(batch_size))
        return
    # Only `eeg` is stacked: the default collate would also stack images a paired dataset may carry.
    yield from (batch.float() for batch in DataLoader(source, batch_size=batch_size, collate_fn=_stack_eeg))


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """int64 [N] class labels: the dataset's `labels` list where it has one, else each item's `label`."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [dataset[i]["label"] for i in range(len(dataset))]
    return np.asarray(labels, dtype=np.int64)


@torch.no_grad()
def encoder_features(
    encoder: EEGEncoder, source: EEGSource, batch_size: int = BATCH_SIZE, device: str | torch.device | None = None
) -> np.ndarray:
    """Frozen-encoder features: eeg [N, C, T] (or a dataset of such items) -> float32 numpy [N, D].

    D = encoder.embed_dim; each row is the mean over tokens of `encoder(eeg)` [N, L, D]. Runs in
    eval mode without gradients and puts the encoder back in the mode it was in (so a training
    loop can call it). `device` None runs where the encoder is; otherwise the encoder is moved there.
    """
    if device is not None:
        encoder.to(device)
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        rows = [encoder(eeg.to(device)).mean(dim=1).float().cpu() for eeg in _eeg_batches(source, batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(rows).numpy()


def raw_time_bins(n_channels: int, n_features: int) -> int:
    """Time bins per channel for `raw_eeg_features`: round(n_features / n_channels), at least 1."""
    return max(1, round(n_features / n_channels))


def raw_eeg_features(source: EEGSource, n_features: int, batch_size: int = 256) -> np.ndarray:
    """Raw-EEG baseline features: eeg [N, C, T] (or a dataset) -> float32 numpy [N, C * B].

    B = `raw_time_bins(C, n_features)`, so the count is the multiple of C nearest `n_features`
    (128 channels, width 1024 -> 8 bins; width 32 -> 1 bin, 128 features). Each channel's T samples
    are averaged over B bins - torch's `adaptive_avg_pool1d`: bin b covers samples
    floor(b * T / B) .. ceil((b + 1) * T / B) - 1, i.e. T / B consecutive samples when B divides T -
    and the result is flattened channel-major: feature c * B + b = mean of channel c in bin b.
    Averaging keeps the slow, evoked part of the response that a linear classifier of raw EEG uses.
    """
    rows = []
    for eeg in _eeg_batches(source, batch_size):
        n_bins = raw_time_bins(eeg.shape[1], n_features)
        rows.append(F.adaptive_avg_pool1d(eeg, n_bins).flatten(1))
    return torch.cat(rows).numpy()


# ---------------------------------------------------------------------------------------------
# Probes


def wilson_interval(n_correct: int, n: int, level: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of the proportion n_correct / n (scipy's `binomtest`)."""
    ci = binomtest(int(n_correct), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _scored(pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy of predictions [N] against labels [N], with its count and Wilson interval."""
    n_correct = int((pred == labels).sum())
    return {"accuracy": n_correct / len(labels), "ci95": wilson_interval(n_correct, len(labels)),
            "n_correct": n_correct, "n": int(len(labels))}


def _standardised(train_x: np.ndarray, *others: np.ndarray | None) -> list[np.ndarray | None]:
    """Every array scaled with the training features' per-feature mean and standard deviation."""
    scaler = StandardScaler().fit(train_x)
    return [scaler.transform(train_x)] + [None if x is None else scaler.transform(x) for x in others]


def _check_probe_inputs(train_x, train_y, val_x, val_y, test_x, test_y) -> None:
    pairs = {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}
    for name, (x, y) in pairs.items():
        if name == "test" and x is None and y is None:
            continue
        if x is None or y is None or np.ndim(x) != 2 or len(x) != len(y) or len(y) == 0:
            raise ConfigError(f"{name} features must be [N, D] with N >= 1 matching {name} labels [N], got "
                              f"{np.shape(x)} and {np.shape(y)}")
    if len(np.unique(train_y)) < 2:
        raise ConfigError("the training split holds a single class: there is nothing to classify")


def _probe_result(name: str, grid: dict, chosen: float, model, val, test, train_y, n_features: int) -> dict:
    """The dict both probes return (see `linear_probe`)."""
    val_x, val_y = val
    result = {
        "probe": name,
        "hyper_parameter": "C" if name == "linear" else "k",
        "chosen": chosen,
        "val_accuracy_by_choice": {str(k): v for k, v in grid.items()},
        "val": _scored(model.predict(val_x), val_y),
        "n_train": int(len(train_y)),
        "n_features": int(n_features),
        "n_classes": int(len(np.unique(train_y))),
        "chance": 1.0 / len(np.unique(train_y)),
    }
    if test[0] is not None:
        result["test"] = _scored(model.predict(test[0]), test[1])
    return result


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
    test_x: np.ndarray | None = None, test_y: np.ndarray | None = None, Cs: Sequence[float] = LINEAR_PROBE_CS,
) -> dict[str, Any]:
    """Multinomial logistic regression on standardised features [N, D]; C chosen on val.

    Returns {"probe": "linear", "hyper_parameter": "C", "chosen": C, "val_accuracy_by_choice":
    {str(C): val accuracy}, "val" and (with test data) "test": {"accuracy", "ci95" (Wilson 95%),
    "n_correct", "n"}, "n_train", "n_features", "n_classes", "chance" (1 / n_classes: the expected
    accuracy of a uniform guess), "not_converged": [C whose fit hit LOGREG_MAX_ITER]}.
    """
    _check_probe_inputs(train_x, train_y, val_x, val_y, test_x, test_y)
    train_s, val_s, test_s = _standardised(train_x, val_x, test_x)
    models, grid, not_converged = {}, {}, []
    for C in sorted(Cs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded below instead
            model = LogisticRegression(C=C, max_iter=LOGREG_MAX_ITER).fit(train_s, train_y)
        if model.n_iter_.max() >= LOGREG_MAX_ITER:
            not_converged.append(C)
        models[C], grid[C] = model, float((model.predict(val_s) == val_y).mean())
    best = max(grid, key=lambda C: (grid[C], -C))  # ties -> the smaller C
    result = _probe_result("linear", grid, best, models[best], (val_s, val_y), (test_s, test_y), train_y,
                           train_x.shape[1])
    return {**result, "not_converged": not_converged}


def knn_probe(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
    test_x: np.ndarray | None = None, test_y: np.ndarray | None = None, ks: Sequence[int] = KNN_KS,
    metric: str = KNN_METRIC,
) -> dict[str, Any]:
    """k-nearest-neighbour vote on standardised features [N, D]; k chosen on val (ties -> larger k).

    k values above the number of training trials are skipped. Returns the same dict as
    `linear_probe`, with "probe": "knn", "hyper_parameter": "k" and "metric".
    """
    _check_probe_inputs(train_x, train_y, val_x, val_y, test_x, test_y)
    usable = sorted({int(k) for k in ks if 1 <= k <= len(train_y)})
    if not usable:
        raise ConfigError(f"no k in {list(ks)} fits {len(train_y)} training trials")
    train_s, val_s, test_s = _standardised(train_x, val_x, test_x)
    # brute force: exact, and at a few thousand trials as fast as any index
    knn = KNeighborsClassifier(metric=metric, algorithm="brute").fit(train_s, train_y)
    grid = {k: float((knn.set_params(n_neighbors=k).predict(val_s) == val_y).mean()) for k in usable}
    best = max(grid, key=lambda k: (grid[k], k))  # ties -> the larger k
    knn.set_params(n_neighbors=best)
    result = _probe_result("knn", grid, best, knn, (val_s, val_y), (test_s, test_y), train_y, train_x.shape[1])
    return {**result, "metric": metric}


# ---------------------------------------------------------------------------------------------
# The report: 3 feature kinds x 2 probes


def random_encoder_like(config: Mapping[str, Any], seed: int = RANDOM_ENCODER_SEED) -> EEGEncoder:
    """A freshly initialised `EEGEncoder` of architecture `config` (eval mode), from `seed` only.

    The global RNG is forked, so building it changes no one else's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(dict(config)).eval()


def _split_features(kind: str, encoder: EEGEncoder | None, datasets: Mapping[str, EEGSource],
                    n_raw_features: int, batch_size: int, device: str | torch.device | None) -> dict[str, np.ndarray]:
    """{split: features [N, D]} of one feature kind."""
    if kind == "raw_eeg":
        return {s: raw_eeg_features(d, n_raw_features) for s, d in datasets.items()}
    return {s: encoder_features(encoder, d, batch_size, device) for s, d in datasets.items()}


def probe_encoder(
    encoder: EEGEncoder | None,
    datasets: Mapping[str, Dataset],
    random_config: Mapping[str, Any] | None = None,
    n_raw_features: int | None = None,
    batch_size: int = BATCH_SIZE,
    device: str | torch.device | None = None,
    seed: int = RANDOM_ENCODER_SEED,
    Cs: Sequence[float] = LINEAR_PROBE_CS,
    ks: Sequence[int] = KNN_KS,
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Linear and k-NN probes of `encoder`, a random encoder of its config and raw EEG.

    datasets: {"train", "val"[, "test"]} -> datasets of items with `eeg` [C, T] and `label`.
    random_config: the random encoder's architecture (default `encoder.config`; with neither, that
    row is skipped). n_raw_features: target width of the raw-EEG features (default the encoder's
    width). data: free-form description of the data, copied into the report.
    Returns {"format", "data", "n_trials": {split: N}, "n_classes", "chance", "encoder_config",
    "random_encoder_seed", "raw_eeg_time_bins", "interval", "rows": [{"features": kind,
    **linear_probe / knn_probe result}], "seconds": {kind: seconds}}.
    """
    if not {"train", "val"} <= set(datasets) or not set(datasets) <= set(SPLITS):
        raise ConfigError(f"datasets must hold 'train' and 'val' (and optionally 'test'), got {sorted(datasets)}")
    random_config = dict(random_config or (encoder.config if encoder is not None else {}))
    width = encoder.embed_dim if encoder is not None else random_config.get("embed_dim")
    n_raw_features = int(n_raw_features or width or RAW_FEATURES_DEFAULT)
    if device is None and encoder is not None:  # the random encoder runs where the given one is
        device = next(encoder.parameters()).device
    encoders = {"encoder": encoder, "random_encoder": None, "raw_eeg": None}
    if random_config:
        encoders["random_encoder"] = random_encoder_like(random_config, seed)
    labels = {s: dataset_labels(d) for s, d in datasets.items()}
    test = "test" in datasets
    rows, seconds = [], {}
    for kind in FEATURE_KINDS:
        if kind != "raw_eeg" and encoders[kind] is None:
            continue
        start = time.perf_counter()
        x = _split_features(kind, encoders[kind], datasets, n_raw_features, batch_size, device)
        splits = (x["train"], labels["train"], x["val"], labels["val"],
                  x["test"] if test else None, labels["test"] if test else None)
        rows += [{"features": kind, **linear_probe(*splits, Cs=Cs)}, {"features": kind, **knn_probe(*splits, ks=ks)}]
        seconds[kind] = round(time.perf_counter() - start, 3)
    n_classes = len(np.unique(labels["train"]))
    n_channels = int(datasets["train"][0]["eeg"].shape[0])
    return {
        "format": REPORT_FORMAT,
        "data": dict(data or {}),
        "n_trials": {s: int(len(y)) for s, y in labels.items()},
        "n_classes": n_classes,
        "chance": 1.0 / n_classes,
        "encoder_config": dict(encoder.config) if encoder is not None else None,
        "random_encoder_seed": seed if random_config else None,
        "raw_eeg_time_bins": raw_time_bins(n_channels, n_raw_features),
        "interval": f"Wilson score interval, {CONFIDENCE:.0%}, over the trials of the split",
        "rows": rows,
        "seconds": seconds,
    }


def _percent(scored: dict[str, Any] | None) -> str:
    if scored is None:
        return "-"
    low, high = scored["ci95"]
    return f"{100 * scored['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def probe_markdown(report: Mapping[str, Any]) -> str:
    """A Markdown page: what was probed, then one table row per feature kind x probe."""
    n = report["n_trials"]
    data = ", ".join(f"{k} {v}" for k, v in report["data"].items())
    lines = [
        "# Linear and k-NN probes of the frozen EEG encoder",
        "",
        (f"{data}: " if data else "") + " / ".join(f"{n[s]} {s}" for s in SPLITS if s in n)
        + f" trials, {report['n_classes']} classes (chance {100 * report['chance']:.1f}%).",
        "Features: `encoder` = the frozen encoder's tokens averaged over time; `random_encoder` = the same "
        f"architecture, randomly initialised (seed {report['random_encoder_seed']}); `raw_eeg` = the EEG "
        f"window average-pooled into {report['raw_eeg_time_bins']} time bin(s) per channel. All standardised "
        "on the training split.",
        f"Probes fitted on train; C (linear) and k (k-NN) chosen on val, so val accuracy is optimistic. "
        f"Intervals: {report['interval']}.",
        "",
        "| features | dim | probe | chosen | val accuracy [95% CI] | test accuracy [95% CI] |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in report["rows"]:
        chosen = f"{row['hyper_parameter']}={row['chosen']:g}"
        lines.append(f"| {row['features']} | {row['n_features']} | {row['probe']} | {chosen} | "
                     f"{_percent(row['val'])} | {_percent(row.get('test'))} |")
    return "\n".join(lines) + "\n"


def write_probe(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write `out_dir/probe.json` (the report) and `out_dir/probe.md` (its table), atomically."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "probe.json", "markdown": out_dir / "probe.md"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["markdown"], probe_markdown(report))
    return paths


def quick_probe(
    encoder: EEGEncoder, train: EEGSource, val: EEGSource, train_labels: np.ndarray | None = None,
    val_labels: np.ndarray | None = None, batch_size: int = BATCH_SIZE, device: str | torch.device | None = None,
    Cs: Sequence[float] = QUICK_PROBE_CS,
) -> float:
    """The linear probe's val accuracy for `encoder`: a cheap, deterministic monitor of stage 1.

    train / val: datasets of items with `eeg` and `label`, or EEG arrays [N, C, T] with their labels
    given as `train_labels` / `val_labels` [N]. The encoder's training mode and device are kept
    (with `device` None), so a training loop can call this every few epochs.
    """
    train_y = dataset_labels(train) if train_labels is None else np.asarray(train_labels)
    val_y = dataset_labels(val) if val_labels is None else np.asarray(val_labels)
    train_x = encoder_features(encoder, train, batch_size, device)
    val_x = encoder_features(encoder, val, batch_size, device)
    return linear_probe(train_x, train_y, val_x, val_y, Cs=Cs)["val"]["accuracy"]


# ---------------------------------------------------------------------------------------------
# python -m dreamdiffusion.evaluation.probe


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dreamdiffusion.evaluation.probe",
                                     description="Linear and k-NN probes of a frozen stage-1 EEG encoder on "
                                                 "ImageNet-EEG, against a random encoder and raw EEG.")
    parser.add_argument("--encoder", required=True,
                        help="our export folder, our stage-1 Lightning checkpoint or the authors' checkpoint")
    parser.add_argument("--eeg", required=True, help="eeg_5_95_std.pth")
    parser.add_argument("--splits", required=True, help="block_splits_by_image_single.pth or _all.pth")
    parser.add_argument("--subject", type=int, default=4, help="1..6, or 0 for all subjects (default 4)")
    parser.add_argument("--split-index", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: a 'probe' folder next to the encoder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-times", type=int, default=None, help="samples per window (default: the encoder's)")
    parser.add_argument("--time-window", type=int, nargs=2, default=(20, 460), metavar=("START", "STOP"))
    parser.add_argument("--min-trial-length", type=int, default=450)
    parser.add_argument("--max-trial-length", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=RANDOM_ENCODER_SEED, help="seed of the random encoder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command: load the encoder and the three splits, probe, write probe.json/.md, print the table."""

    args = _parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device, "--device")
    encoder = load_eeg_encoder(args.encoder)
    n_times = encoder.n_times if args.n_times is None else args.n_times
    if n_times != encoder.n_times:
        raise ConfigError(f"--n-times {n_times} does not match the encoder, which takes {encoder.n_times} samples")
    datasets = {
        split: ImageNetEEGDataset(args.eeg, args.splits, split=split, split_index=args.split_index,
                                  subject=args.subject, time_window=tuple(args.time_window), n_times=n_times,
                                  min_trial_length=args.min_trial_length, max_trial_length=args.max_trial_length)
        for split in SPLITS
    }
    if datasets["train"].n_channels != encoder.n_channels:
        raise DataError(f"{args.eeg} has {datasets['train'].n_channels} EEG channels; the encoder takes "
                        f"{encoder.n_channels}")
    data = {"eeg": str(args.eeg), "subject": args.subject, "split_index": args.split_index}
    report = probe_encoder(encoder, datasets, batch_size=args.batch_size, device=device, seed=args.seed,
                           data=data)
    report["encoder_path"] = str(args.encoder)
    out_dir = Path(args.out) if args.out is not None else Path(args.encoder).resolve().parent / "probe"
    paths = write_probe(report, out_dir)
    print(probe_markdown(report))
    print(f"wrote {paths['json']} and {paths['markdown']}")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main))
