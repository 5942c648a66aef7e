"""Near-duplicate groups, so that copies and neighbouring slices never straddle a split.

Public slice sets hold re-saved copies and consecutive slices of one patient with
no patient ID; a random split then leaks. Each image becomes a small normalised
thumbnail (32×32); images whose thumbnails correlate above a threshold (directly or through
a chain) form one group, which the split keeps whole.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.transform import resize

THUMBNAIL = 32


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A zero-mean, unit-norm 32×32 vector: invariant to gain and offset."""
    small = resize(image, (THUMBNAIL, THUMBNAIL), anti_aliasing=True).ravel().astype(np.float32)
    small -= small.mean()
    norm = np.linalg.norm(small)
    return small / norm if norm > 0 else small


def duplicate_groups(thumbnails: np.ndarray, min_correlation: float, block: int = 2048) -> np.ndarray:
    """Group id per row: connected components of the 'correlates ≥ min_correlation' graph.

    Works block by block, so memory stays at block × n correlations.
    """
    n = len(thumbnails)
    rows, cols = [np.zeros(0, dtype=int)], [np.zeros(0, dtype=int)]
    for start in range(0, n, block):
        similarity = thumbnails[start : start + block] @ thumbnails.T
        i, j = np.nonzero(similarity >= min_correlation)
        keep = i + start < j
        rows.append(i[keep] + start)
        cols.append(j[keep])
    edges = coo_matrix((np.ones(sum(map(len, rows))), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    _, labels = connected_components(edges, directed=False)
    return labels
