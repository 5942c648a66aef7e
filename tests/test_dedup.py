import numpy as np

from components.dedup import THUMBNAIL, duplicate_groups, thumbnail


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
    groups = duplicate_groups(vectors.astype(np.float32), 0.985, block=2, mirror_correlation=None)  # not thumbnails: no mirror
    assert groups[0] == groups[1] == groups[2]
    assert groups[3] != groups[0]


def test_an_exact_copy_with_another_label_is_a_conflict_but_a_near_one_is_not():
    from components.dedup import label_conflicts

    rng = np.random.default_rng(1)
    base, other = rng.random((64, 64)).astype(np.float32), rng.random((64, 64)).astype(np.float32)
    near = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)  # a neighbouring slice: alike, not the same image
    images = [base, base[:, ::-1], other, other * 0.5, near]
    labels = ["glioma", "pituitary", "notumor", "notumor", "meningioma"]
    thumbnails = np.stack([thumbnail(image) for image in images])
    assert float(thumbnails[0] @ thumbnails[4]) > 0.97, "near enough to be a near-duplicate"
    assert label_conflicts(thumbnails, labels, 0.9997) == {0: ["pituitary"], 1: ["glioma"]}, "mirrored copy: both; same label: none"


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


def test_a_mirrored_copy_joins_its_original_but_a_mirror_symmetric_stranger_does_not():
    from components.dedup import mirrored

    rng = np.random.default_rng(2)
    base = rng.random((64, 64)).astype(np.float32)
    colour = rng.random((64, 64, 3)).astype(np.float32)
    images = [base, base[:, ::-1] * 0.7 + 0.1, rng.random((64, 64)).astype(np.float32)]
    thumbnails = np.stack([thumbnail(i) for i in images])
    assert np.allclose(mirrored(thumbnails)[0], thumbnails[1], atol=1e-5), "mirroring commutes with the thumbnail"
    assert np.allclose(mirrored(thumbnail(colour)[None])[0], thumbnail(colour[:, ::-1]), atol=1e-5), "colour thumbnails too"
    groups = duplicate_groups(thumbnails, 0.97)
    assert groups[0] == groups[1] != groups[2]
    assert len(set(duplicate_groups(thumbnails, 0.97, mirror_correlation=None))) == 3, "without the mirror it is another image"
    assert len(duplicate_groups(np.zeros((0, THUMBNAIL**2), np.float32), 0.97)) == 0


def test_a_mirrored_look_alike_needs_a_copys_correlation():
    """Two vectors whose mirror correlation lies between the threshold and MIRRORED_COPY stay apart."""
    from components.dedup import MIRRORED_COPY, mirrored

    rng = np.random.default_rng(4)
    a = thumbnail(rng.random((64, 64)))
    noise = rng.normal(size=a.shape).astype(np.float32)
    noise -= noise.mean() + (noise @ a) * a  # orthogonal to a and zero-mean
    noise /= np.linalg.norm(noise)
    look_alike = mirrored((0.98 * a + np.sqrt(1 - 0.98**2) * noise)[None])[0]  # mirror correlation 0.98
    assert 0.97 < float(mirrored(look_alike[None])[0] @ a) < MIRRORED_COPY
    assert len(set(duplicate_groups(np.stack([a, look_alike]), 0.97))) == 2
    assert len(set(duplicate_groups(np.stack([a, look_alike]), 0.97, mirror_correlation=0.975))) == 1


def test_mirrored_views_follow_the_plain_ones():
    from components.dedup import views

    rng = np.random.default_rng(3)
    colour = rng.random((48, 48, 3))
    plain, both = views(colour), views(colour, mirror=True)
    assert len(both) == 2 * len(plain) == 8 and all(np.array_equal(a, b) for a, b in zip(plain, both))
    assert np.allclose(both[5], thumbnail(colour[:, ::-1, 0]))
