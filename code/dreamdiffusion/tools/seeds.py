"""A row's figures over several seeds: mean +- sd, the per-seed values, and one pooled interval.

One run of a row gives one draw of everything random in it (stage-1 and stage-2 initialisation, data
order, masks, sampling noise). Two demo runs of the same row on two machines gave 21.5% and 19.0%, as
far apart as the rows the table compares; so the grid (`tools/grid.py`, `--seeds N`) runs each row N
times and reports, per figure:
  - the mean over the seeds that finished and their sample standard deviation (ddof 1; none for one),
  - every seed's own figure, in seed order,
  - for the n-way top-1, a bootstrap 95% interval over test trials pooled across the seeds: the trials
    are resampled together (every seed scored the same test trials) and each resample's figure is the
    mean over seeds and trials. It says how much the test set's size leaves uncertain in the
    seed-averaged figure; the sd says how much a single run moves from seed to seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 1000  # as stage 3's default `bootstrap_samples`
BOOTSTRAP_SEED = 0


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, list[float]]:
    """(mean, sample sd, the values) of the values that are not None; sd is None below two values."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None, None, []
    return float(np.mean(kept)), (float(np.std(kept, ddof=1)) if len(kept) > 1 else None), kept


def trial_scores(report: dict[str, Any]) -> np.ndarray | None:
    """Each test trial's n-way top-1 averaged over its sample slots (float64 [n_trials]), from a stage-3
    metrics.json; None when it has no n-way scores."""
    trials = report.get("trials") or []
    if not trials or "n_way" not in trials[0]:
        return None
    return np.array([np.mean(t["n_way"]) for t in trials], dtype=np.float64)


def pooled_interval(per_seed: Sequence[np.ndarray], n_samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                    confidence: float = 0.95) -> list[float] | None:
    """The bootstrap interval of the seed-averaged mean: trials resampled jointly across the seeds
    (`per_seed`: one [n_trials] array per seed, the same trials in the same order). None when the seeds
    scored different numbers of trials (they did not score the same test set)."""
    if not per_seed or len({len(s) for s in per_seed}) != 1:
        return None
    scores = np.stack(per_seed)  # [seeds, trials]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, scores.shape[1], size=(n_samples, scores.shape[1]))
    means = scores[:, idx].mean(axis=(0, 2))  # [n_samples]
    tail = (1 - confidence) / 2
    return [float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))]


def combine_seeds(per_seed: Sequence[dict[str, Any]], reports: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """One row's figures over its seeds. `per_seed`: `grid.row_summary` of each seed's run (in seed
    order); `reports`: their stage-3 metrics.json (None where not run). With one finished seed the
    figures are that run's own (its intervals are stage 3's); with more, each figure is the mean over
    the finished seeds with `<figure>_sd` and `<figure>_per_seed`, and `top1_ci` the pooled interval."""
    done = [(s, r) for s, r in zip(per_seed, reports) if s["status"] == "done"]
    out: dict[str, Any] = {"seeds": len(done), "seeds_planned": len(per_seed)}
    if not done:
        return {**per_seed[0], **out}
    if len(done) == 1:
        return {**done[0][0], **out, "top1_sd": None}
    first = done[0][0]
    out.update(status="done", n_trials=first["n_trials"], n_way=first["n_way"],
               num_images_per_eeg=first["num_images_per_eeg"], retrieval_n_way=first["retrieval_n_way"],
               retrieval_chance=first["retrieval_chance"])
    for name in ("top1", "top1_best_slot", "retrieval_top1", "clip_similarity"):
        mean, sd, values = mean_sd([s.get(name) for s, _ in done])
        out.update({name: mean, f"{name}_sd": sd, f"{name}_per_seed": values})
    if out["top1"] is not None:
        scores = [trial_scores(r) for _, r in done]
        out["top1_ci"] = pooled_interval(scores) if all(s is not None for s in scores) else None
        out["top1_per_slot"] = np.mean([s["top1_per_slot"] for s, _ in done], axis=0).tolist()
    probes = [s["probe"] for s, _ in done if "probe" in s]
    if probes:
        out["probe"], out["probe_sd"], out["probe_per_seed"] = {}, {}, {}
        for key in probes[0]:
            out["probe"][key], out["probe_sd"][key], out["probe_per_seed"][key] = mean_sd([p.get(key) for p in probes])
    return out


def probe_rows_over_seeds(reports: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The encoder probe's rows over seeds: per (features, probe), the test accuracy's mean, sd and
    per-seed values (from each seed's probe.json; None where not run)."""
    done = [r for r in reports if r is not None]
    if not done:
        return []
    out = []
    for row in done[0]["rows"]:
        key = (row["features"], row["probe"])
        values = [_accuracy(r, key, "test") for r in done]
        val = [_accuracy(r, key, "val") for r in done]
        mean, sd, per_seed = mean_sd(values)
        out.append({"features": key[0], "probe": key[1], "test_mean": mean, "test_sd": sd, "test_per_seed": per_seed,
                    "val_mean": mean_sd(val)[0], "seeds": len(done)})
    return out


def _accuracy(report: dict[str, Any], key: tuple[str, str], split: str) -> float | None:
    row = next((x for x in report["rows"] if (x["features"], x["probe"]) == key), {})
    return (row.get(split) or {}).get("accuracy")


def pct_spread(mean: float | None, sd: float | None, per_seed: Sequence[float] = ()) -> str:
    """"21.5% ± 1.3 (20.1, 22.0, 22.4)" (percentage points), or "21.5%" for one seed, "–" for none."""
    if mean is None:
        return "–"
    text = f"{mean:.1%}"
    if sd is not None:
        text += f" ± {sd * 100:.1f} ({', '.join(f'{v:.1%}' for v in per_seed)})"
    return text
