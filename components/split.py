"""Split: train/val/test, stratified by label and grouped so nothing leaks.

A group is every image linked by a shared subject or a shared near-duplicate
group (transitively), so a patient, or two copies of one slice, never sit on
both sides. The split is a pure function of the manifest and the seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from components.config import SplitConfig, load_params
from components.errors import DataError, TumorScopeError

GIANT_GROUP_SHARE = 0.05


def leakage_groups(manifest: pd.DataFrame) -> np.ndarray:
    """Connected components of images joined by subject or near-duplicate group."""
    n = len(manifest)
    subject_codes = pd.factorize(manifest["subject"])[0]
    duplicate_codes = pd.factorize(manifest["duplicate_group"])[0] + subject_codes.max() + 1
    nodes = n + duplicate_codes.max() + 1
    rows = np.concatenate([np.arange(n), np.arange(n)])
    cols = np.concatenate([n + subject_codes, n + duplicate_codes])
    graph = coo_matrix((np.ones(2 * n), (rows, cols)), shape=(nodes, nodes))
    _, labels = connected_components(graph, directed=False)
    return pd.factorize(labels[:n])[0]


def hold_out(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of about ``fraction`` of the rows, whole groups, label-stratified."""
    folds = max(2, round(1 / fraction))
    if len(np.unique(groups)) < folds:
        raise TumorScopeError(f"only {len(np.unique(groups))} independent groups: too few to hold out {fraction:.0%}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def assign(manifest: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    """Train/val/test and folds. Feedback rows (``origin == 'feedback'``) only ever train: the split of
    the source rows is computed without them, so the test set stays fixed across retrainings."""
    is_feedback = manifest["origin"].eq("feedback").to_numpy() if "origin" in manifest.columns else np.zeros(len(manifest), bool)
    source = _assign_source(manifest[~is_feedback].reset_index(drop=True), config)
    if not is_feedback.any():
        return source
    return _add_feedback(source, manifest[is_feedback].reset_index(drop=True), config)


def _add_feedback(source: pd.DataFrame, feedback: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    """Feedback rows join the training split, in their leakage group's fold; a row linked (as a near-duplicate)
    to a validation or test image is dropped, since keeping it would leak and moving the image would change the test set."""
    combined = pd.concat([source, feedback], ignore_index=True)
    joint = leakage_groups(combined)
    held_out = set(joint[: len(source)][source["split"].to_numpy() != "train"])
    source_group = dict(zip(joint[: len(source)], zip(source["group"], source["fold"])))
    rows, dropped, offset = [], 0, int(source["group"].max()) + 1
    for position, row in enumerate(feedback.to_dict("records")):
        component = joint[len(source) + position]
        if component in held_out:
            dropped += 1
            continue
        group, fold = source_group.get(component, (offset + int(component), int(component) % config.folds if config.folds >= 2 else -1))
        rows.append({**row, "group": group, "split": "train", "fold": fold})
    if dropped:
        print(f"split: {dropped} feedback images duplicate validation/test images and are left out")
    return pd.concat([source, pd.DataFrame(rows, columns=[*feedback.columns, "group", "split", "fold"])], ignore_index=True)


def _assign_source(manifest: pd.DataFrame, config: SplitConfig) -> pd.DataFrame:
    groups = leakage_groups(manifest)
    labels = manifest["label"].to_numpy()
    split = np.full(len(manifest), "train", dtype=object)
    test = hold_out(labels, groups, config.test_fraction, config.seed)
    split[test] = "test"
    rest = np.flatnonzero(~test)
    val = hold_out(labels[rest], groups[rest], config.val_fraction / (1 - config.test_fraction), config.seed + 1)
    split[rest[val]] = "val"
    return manifest.assign(group=groups, split=split, fold=_folds(labels, groups, test, config))


def _folds(labels: np.ndarray, groups: np.ndarray, test: np.ndarray, config: SplitConfig) -> np.ndarray:
    """Cross-validation folds over everything outside the test split (-1 on test rows), grouped and stratified."""
    fold = np.full(len(labels), -1)
    rest = np.flatnonzero(~test)
    if config.folds < 2 or len(np.unique(groups[rest])) < config.folds:
        return fold
    splitter = StratifiedGroupKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(rest)), labels[rest], groups[rest])):
        fold[rest[held]] = k
    return fold


def check_no_leak(assigned: pd.DataFrame) -> None:
    """Fail loudly if any subject or near-duplicate group spans two splits."""
    for column in ("subject", "duplicate_group"):
        spans = assigned.groupby(column)["split"].nunique()
        if "fold" in assigned.columns:
            spans = np.maximum(spans, assigned.groupby(column)["fold"].nunique())
        if (spans > 1).any():
            raise TumorScopeError(f"leak: {int((spans > 1).sum())} {column} values span more than one split or fold")


def run(config: SplitConfig) -> pd.DataFrame:
    if not config.manifest.exists():
        raise DataError(config.manifest, "manifest not found: run the ingest stage first")
    assigned = assign(pd.read_csv(config.manifest), config)
    check_no_leak(assigned)
    largest = assigned["group"].value_counts()
    share = largest.iloc[0] / len(assigned)
    print(f"split: {len(largest)} independent groups; the largest holds {largest.iloc[0]} images ({share:.0%})")
    if share > GIANT_GROUP_SHARE:  # safe against leaks, but one split then stands for one group, not the population
        print(f"split: warning: one group holds {share:.0%} of the images; check ingest.duplicate_correlation (chained near-duplicates)")
    config.out.parent.mkdir(parents=True, exist_ok=True)
    assigned.to_csv(config.out, index=False)
    table = pd.crosstab(assigned["split"], assigned["label"])
    print(f"split into {assigned['group'].nunique()} leak-free groups:\n{table.to_string()}")
    return assigned


def main() -> None:
    from components.stage import run_stage

    run_stage(lambda: run(load_params().split))


if __name__ == "__main__":
    main()
