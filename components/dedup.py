"""Near-duplicate groups, so that copies and neighbouring slices never straddle a split.

Public slice sets hold re-saved copies, left-right mirrored copies and consecutive slices of one patient with
no patient ID; a random split then leaks. Each image becomes a small normalised thumbnail (32×32); images whose
thumbnails correlate above a threshold, as they are or one of them mirrored (directly or through a chain), form one
group, which the split keeps whole. Masoud's set holds about a thousand mirrored copies: 3,837 groups without the
mirror, 2,767 with it.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.transform import resize

from components.config import MIRRORED_COPY

THUMBNAIL = 32


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A zero-mean, unit-norm 32×32 vector: invariant to gain and offset."""
    small = resize(image, (THUMBNAIL, THUMBNAIL), anti_aliasing=True).ravel().astype(np.float32)
    small -= small.mean()
    norm = np.linalg.norm(small)
    return small / norm if norm > 0 else small


def mirrored(thumbnails: np.ndarray) -> np.ndarray:
    """The thumbnails of the left-right mirrored images: each thumbnail's columns reversed (the resize is symmetric,
    so mirroring commutes with it)."""
    n = len(thumbnails)
    channels = thumbnails.shape[1] // THUMBNAIL**2
    return thumbnails.reshape(n, THUMBNAIL, THUMBNAIL, channels)[:, :, ::-1].reshape(thumbnails.shape)


def duplicate_groups(
    thumbnails: np.ndarray, min_correlation: float, block: int = 2048, mirror_correlation: float | None = MIRRORED_COPY
) -> np.ndarray:
    """Group id per row: connected components of the graph of images that correlate ≥ ``min_correlation``, or
    ≥ ``mirror_correlation`` once one is mirrored (None: not mirrored; rows of a thumbnail's length).

    Works block by block, so memory stays at block × n correlations.
    """
    n = len(thumbnails)
    flipped = mirrored(thumbnails) if mirror_correlation is not None else None
    rows, cols = [np.zeros(0, dtype=int)], [np.zeros(0, dtype=int)]
    for start in range(0, n, block):
        linked = thumbnails[start : start + block] @ thumbnails.T >= min_correlation
        if flipped is not None:  # a · mirror(b) = mirror(a) · b: the graph stays undirected
            linked |= thumbnails[start : start + block] @ flipped.T >= mirror_correlation
        i, j = np.nonzero(linked)
        keep = i + start < j
        rows.append(i[keep] + start)
        cols.append(j[keep])
    edges = coo_matrix((np.ones(sum(map(len, rows))), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    _, labels = connected_components(edges, directed=False)
    return labels


def label_conflicts(thumbnails: np.ndarray, labels: list[str], min_correlation: float) -> dict[int, list[str]]:
    """Rows with an exact copy (correlating ≥ ``min_correlation`` as it is or mirrored, directly or through a chain)
    that carries another label, and those other labels. One of the labels is wrong and only the data's owner can
    say which: training on both teaches noise, and a test on either scores a coin toss."""
    groups = duplicate_groups(thumbnails, min_correlation, mirror_correlation=min_correlation)
    labels_of: dict[int, set[str]] = {}
    for group, label in zip(groups, labels):
        labels_of.setdefault(group, set()).add(label)
    return {row: sorted(labels_of[group] - {label}) for row, (group, label) in enumerate(zip(groups, labels)) if len(labels_of[group]) > 1}


def views(image: np.ndarray, mirror: bool = False) -> list[np.ndarray]:
    """The thumbnails a copy of this slice could have been made from: its mean and, for colour, each channel (one
    sequence of a multi-sequence slice saved as a gray image); with ``mirror``, each of them mirrored left-right too
    (after the unmirrored ones). A blank plane matches nothing and is left out."""
    planes = [image] if image.ndim == 2 else [image.mean(axis=2), *np.moveaxis(image, 2, 0)]
    planes = [plane for plane in planes if plane.std() > 0]
    return [thumbnail(plane) for plane in planes + ([plane[:, ::-1] for plane in planes] if mirror else [])]


def closest_matches(
    reference: np.ndarray, queries: np.ndarray, query_owner: np.ndarray, block: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Per query image (its best view; ``query_owner`` says which image each view is of): the highest correlation
    with any reference thumbnail, and which one. Block by block, so memory stays at block × len(reference)."""
    best = np.empty(len(queries), dtype=np.float32)
    best_reference = np.empty(len(queries), dtype=int)
    for start in range(0, len(queries), block):
        similarity = queries[start : start + block] @ reference.T
        best_reference[start : start + block] = similarity.argmax(axis=1)
        best[start : start + block] = similarity.max(axis=1)
    images = int(query_owner.max()) + 1
    per_image, which = np.full(images, -1.0), np.zeros(images, dtype=int)
    for view, owner in enumerate(query_owner):
        if best[view] > per_image[owner]:
            per_image[owner], which[owner] = best[view], best_reference[view]
    return per_image, which
