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


def test_each_image_keeps_its_best_view_against_every_reference_image():
    from components.dedup import closest_matches

    rng = np.random.default_rng(0)
    reference = np.stack([thumbnail(rng.random((64, 64))) for _ in range(3)])
    unrelated = thumbnail(rng.random((64, 64)))
    queries = np.stack([unrelated, reference[2], unrelated, unrelated])  # image 0: a view is reference 2; image 1: none
    best, which = closest_matches(reference, queries, np.array([0, 0, 1, 1]), block=3)  # blocks split image 0's views
    assert best[0] > 0.999 and which[0] == 2
    assert best[1] < 0.5


def test_a_colour_slice_has_its_mean_and_each_channel_as_views_and_a_blank_plane_none():
    from components.dedup import views

    rng = np.random.default_rng(1)
    colour = rng.random((48, 48, 3))
    colour[..., 2] = 0  # a blank channel (a sequence the study lacks) matches nothing
    seen = views(colour)
    assert len(seen) == 3 and np.allclose(seen[1], thumbnail(colour[..., 0]))
    assert views(np.zeros((48, 48))) == []
