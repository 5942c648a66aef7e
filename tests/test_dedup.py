import numpy as np

from components.dedup import duplicate_groups, thumbnail


def test_copies_and_rescaled_copies_group_but_distinct_images_do_not():
    rng = np.random.default_rng(0)
    base = rng.random((64, 64)).astype(np.float32)
    other = rng.random((64, 64)).astype(np.float32)
    images = [base, base * 0.6 + 0.1, np.clip(base + rng.normal(0, 0.01, base.shape), 0, 1), other]
    groups = duplicate_groups(np.stack([thumbnail(i) for i in images]), 0.97)
    assert groups[0] == groups[1] == groups[2]
    assert groups[3] != groups[0]


def test_chains_form_one_group_and_blank_images_stay_alone():
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.99, 0.141, 0.0])
    c = np.array([0.96, 0.28, 0.0])
    vectors = np.stack([v / np.linalg.norm(v) for v in (a, b, c)] + [np.zeros(3)])
    groups = duplicate_groups(vectors.astype(np.float32), 0.985, block=2)
    assert groups[0] == groups[1] == groups[2]
    assert groups[3] != groups[0]
