"""k-means in torch against known centres, a naive Lloyd and scikit-learn's inertia; the
prototype builder's ``kmeans_sample`` option."""

import pytest
import torch
from sklearn.cluster import KMeans

import sdzero.segmentation.prototypes as prototypes_module
from sdzero.segmentation.features import ColourExtractor
from sdzero.segmentation.kmeans import _kmeans_plus_plus, feature_mixture, kmeans
from sdzero.segmentation.kmeans_points import Points
from sdzero.segmentation.lloyd import lloyd
from sdzero.segmentation.module import OVDiffModule
from sdzero.segmentation.prototypes import (
    KMEANS_SAMPLE,
    PrototypeCache,
    build_prototypes,
    prototypes_from_features,
)


def _blobs(seed=0):
    centres = torch.tensor(
        [[0.0, 0.0, 0.0], [10.0, 0.0, 5.0], [0.0, 10.0, -5.0], [10.0, 10.0, 0.0]]
    )
    g = torch.Generator().manual_seed(seed)
    points = centres.repeat_interleave(150, 0) + 0.1 * torch.randn(600, 3, generator=g)
    return centres, points


def test_recovers_separable_blob_centres():
    centres, points = _blobs()
    result = kmeans(points, 4, seed=0)
    # Match each true centre to its nearest found one: a permutation, all within noise.
    dist = torch.cdist(centres, result.centres)
    assert sorted(dist.argmin(1).tolist()) == [0, 1, 2, 3]
    assert dist.min(1).values.max() < 0.05
    # Every blob is one cluster.
    for blob in result.labels.view(4, 150):
        assert (blob == blob[0]).all()
    expected = ((points - result.centres[result.labels]) ** 2).sum().item()
    assert result.inertia == pytest.approx(expected, rel=1e-5)


def test_inertia_within_one_percent_of_sklearn():
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
    ours = kmeans(x, 8, n_init=4, seed=0)
    theirs = KMeans(8, random_state=0, n_init=4).fit(x.numpy())
    assert ours.inertia <= 1.01 * theirs.inertia_
    assert ours.centres.shape == (8, 64) and ours.labels.shape == (2000,)


def test_deterministic_for_a_seed_and_independent_of_chunking():
    _, points = _blobs(seed=3)
    a = kmeans(points, 5, seed=7)
    b = kmeans(points, 5, seed=7, chunk_size=13)
    assert torch.allclose(a.centres, b.centres, atol=1e-5)
    assert torch.equal(a.labels, b.labels)


def test_more_inits_never_worse():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(2))
    one = kmeans(x, 6, n_init=1, seed=0)
    several = kmeans(x, 6, n_init=5, seed=0)
    # The first of the five inits is the single-init run.
    assert several.inertia <= one.inertia + 1e-6


def test_empty_cluster_takes_the_farthest_point():
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [13.0]])
    # The third centre is far from everything, so its cluster starts empty.
    points = Points(x, None, 1024, None, 1)
    result = lloyd(points, torch.tensor([[0.1], [10.0], [1000.0]]), 10, 0.0)
    assert torch.isfinite(result.centres).all()
    assert sorted(torch.bincount(result.labels, minlength=3).tolist()) == [1, 2, 3]
    assert sorted(result.centres.flatten().tolist()) == pytest.approx([0.1, 10.05, 13.0])


def test_k_equals_n_gives_zero_inertia():
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
    result = kmeans(x, 5)
    assert result.inertia == pytest.approx(0.0, abs=1e-9)
    assert sorted(result.labels.tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "message"),
    [
        (torch.randn(3, 2), 4, {}, "k=4 clusters need at least 4 points, got N=3"),
        (torch.randn(3, 2), 0, {}, "positive int"),
        (torch.randn(3), 1, {}, "expects a non-empty"),
        (torch.tensor([[0.0], [float("nan")]]), 1, {}, "NaN"),
        (torch.randn(3, 2), 2, {"n_init": "many"}, "n_init"),
        (torch.randn(3, 2), 2, {"init_sample": -1}, "init_sample must be None or an int >= 0"),
        (torch.randn(3, 2), 2, {"init_sample": 2.5}, "init_sample"),
        (torch.randn(3, 2), 2, {"init_sample": True}, "init_sample"),
        (torch.tensor([[1.0], [float("inf")]]), 1, {}, "infinite"),
        (torch.randn(3, 2), 2, {"chunk_size": 0}, "chunk_size must be a positive int"),
    ],
)
def test_bad_input(x, k, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kmeans(x, k, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    _, points = _blobs()
    cpu = kmeans(points, 4, seed=0)
    gpu = kmeans(points.cuda(), 4, seed=0)
    assert torch.equal(cpu.labels, gpu.labels.cpu())
    assert torch.allclose(cpu.centres, gpu.centres.cpu(), atol=1e-4)


# --- exactness of the accelerated Lloyd -------------------------------------------------------


def _naive_lloyd(x, centres):
    """Textbook Lloyd in float64 until the labels repeat (no empty clusters on the test data)."""
    x, centres, labels = x.double(), centres.double(), None
    while True:
        new = torch.cdist(x, centres).argmin(1)
        if labels is not None and torch.equal(new, labels):
            return labels, centres
        labels = new
        centres = torch.stack([x[labels == j].mean(0) for j in range(len(centres))])


def test_bounded_lloyd_matches_naive_lloyd():
    # Overlapping clusters: many iterations that move a few points, where the bounds skip most.
    x = feature_mixture(3000, 32, seed=1)
    x = x - x.mean(0)
    points = Points(x, None, 128, None, 1)  # 24 chunks
    init = _kmeans_plus_plus(points, 16, torch.Generator().manual_seed(0))
    ours = lloyd(points, init, 300, 0.0)
    labels, centres = _naive_lloyd(x, init)
    assert ours.n_iter > 10
    assert torch.equal(ours.labels, labels)
    assert torch.allclose(ours.centres.double(), centres, atol=1e-4)
    direct = ((x.double() - centres[labels]) ** 2).sum().item()
    assert ours.inertia == pytest.approx(direct, rel=1e-6)


def test_inertia_is_exact_far_from_the_origin():
    # Centring (by chunks) keeps the expanded distances precise far from the origin.
    x = 1000 + feature_mixture(4000, 48, seed=2) / 10
    for sample in (None, 1000):
        result = kmeans(x, 12, seed=0, init_sample=sample)
        direct = ((x.double() - result.centres.double()[result.labels]) ** 2).sum().item()
        # float32 centres: the direct sum from them agrees to float32 rounding of the centres.
        assert result.inertia == pytest.approx(direct, rel=1e-4)
        nearest = torch.cdist(x.double(), result.centres.double()).argmin(1)
        assert (nearest == result.labels).float().mean() > 0.999


def test_inertia_of_tight_far_apart_clusters_is_summed_directly():
    # Inertia ~1e-12 of sum |x|^2: the sufficient statistics would cancel to noise (~1e-4).
    g = torch.Generator().manual_seed(7)
    centres = 1000 * torch.randn(5, 8, generator=g)
    x = centres.repeat_interleave(40, 0) + 1e-3 * torch.randn(200, 8, generator=g)
    result = lloyd(Points(x, None, 64, None, 1), x[::40].clone(), 10, 0.0)
    direct = ((x.double() - result.centres.double()[result.labels]) ** 2).sum().item()
    assert result.inertia == pytest.approx(direct, rel=1e-6)


def test_results_do_not_depend_on_the_number_of_threads():
    x = feature_mixture(3000, 256, seed=3)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append([kmeans(x, 8, seed=4, init_sample=s, chunk_size=100) for s in (0, 600)])
            assert torch.get_num_threads() == n  # restored after the worker pool
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*runs, strict=True):
        assert torch.equal(one.labels, two.labels) and torch.equal(one.centres, two.centres)
        assert one.inertia == two.inertia


# --- init_sample (seeding and converging on a subsample) --------------------------------------


def test_init_sample_recovers_separable_blob_centres():
    centres, points = _blobs(seed=5)
    result = kmeans(points, 4, seed=0, init_sample=60)
    dist = torch.cdist(centres, result.centres)
    assert sorted(dist.argmin(1).tolist()) == [0, 1, 2, 3]
    assert dist.min(1).values.max() < 0.05
    for blob in result.labels.view(4, 150):
        assert (blob == blob[0]).all()
    assert result.n_iter_sample >= 1 and result.n_iter >= 1


def test_init_sample_inertia_within_one_percent_of_full_and_sklearn():
    # OVDiff's K = 32 on a mixture of 40 unequal components: seedings differ by a few percent,
    # so compare means over seeds. A poor clustering is > 3 % worse: 1 % is a real bound here.
    x = feature_mixture(5000, 64, seed=0)
    seeds = range(4)
    fast = sum(kmeans(x, 32, seed=s, init_sample=2048).inertia for s in seeds)
    full = sum(kmeans(x, 32, seed=s).inertia for s in seeds)
    ref = sum(KMeans(32, random_state=s, n_init="auto").fit(x.numpy()).inertia_ for s in seeds)
    assert fast <= 1.01 * full and fast <= 1.01 * ref
    poor = KMeans(32, init="random", n_init=1, max_iter=1, random_state=0).fit(x.numpy())
    assert poor.inertia_ > 1.03 * ref / len(seeds)


def test_init_sample_is_deterministic_and_falls_back_to_all_points():
    x = feature_mixture(2000, 16, seed=6)
    a, b = (kmeans(x, 6, seed=3, init_sample=500) for _ in range(2))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centres, b.centres)
    assert a.inertia == b.inertia and a.n_iter_sample > 0
    full = kmeans(x, 6, seed=3)
    for sample in (0, 2000, 5000):  # 0 or at least N: k-means++ on all points
        same = kmeans(x, 6, seed=3, init_sample=sample)
        assert torch.equal(same.labels, full.labels) and same.n_iter_sample == 0


def test_feature_mixture_is_seeded():
    x = feature_mixture(100, 24, seed=1)
    assert x.shape == (100, 24) and x.dtype == torch.float32
    assert torch.equal(x, feature_mixture(100, 24, seed=1))
    assert not torch.equal(x, feature_mixture(100, 24, seed=2))


# --- the prototype builder's kmeans_sample ----------------------------------------------------


def test_prototypes_pass_kmeans_sample_and_reject_negative(monkeypatch):
    seen = []

    def spy(pixels, k, **kwargs):
        seen.append(kwargs["init_sample"])
        return kmeans(pixels, k, **kwargs)

    monkeypatch.setattr(prototypes_module, "kmeans", spy)
    feats = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, :4] = True
    p = prototypes_from_features(
        feats, masks, ~masks, class_name="a", extractor="x", kmeans_k=2, kmeans_sample=7
    )
    assert seen == [7, 7] and p.fg.shape == (1 + 2 + 2, 3)
    with pytest.raises(ValueError, match="kmeans_sample must be an int >= 0"):
        prototypes_from_features(
            feats, masks, ~masks, class_name="a", extractor="x", kmeans_sample=-1
        )
    with pytest.raises(ValueError, match="kmeans_sample"):
        build_prototypes(["a"], [ColourExtractor()], None, kmeans_sample=-5)


def test_kmeans_sample_keys_the_prototype_cache(tmp_path):
    class Recorder:  # a cache that records the settings it is asked for and builds nothing
        def __init__(self):
            self.settings = []

        def get_or_build(self, name, build_fn, settings):
            self.settings.append(settings["colour"])
            return {}

    class Source:
        def settings(self, name):
            return {"name": name}

    cache = Recorder()
    for kwargs in ({"kmeans_sample": 5}, {}):
        build_prototypes(["a"], [ColourExtractor()], Source(), "saliency", cache, **kwargs)
    five, default = cache.settings
    assert five["kmeans_sample"] == 5 and default["kmeans_sample"] == KMEANS_SAMPLE
    paths = PrototypeCache(tmp_path)
    assert paths.path("a", "colour", five) != paths.path("a", "colour", default)


def test_ovdiff_module_validates_kmeans_sample():
    module = OVDiffModule(backbone={}, mask_proposer="attention", kmeans_sample=0)
    assert module.settings.kmeans_sample == 0
    with pytest.raises(ValueError, match="method.kmeans_sample must be >= 0"):
        OVDiffModule(backbone={}, mask_proposer="attention", kmeans_sample=-1)
    with pytest.raises(ValueError, match="method.kmeans_sample must be an integer, got 2.5"):
        OVDiffModule(backbone={}, mask_proposer="attention", kmeans_sample=2.5)
