"""k-means in torch against known centres and scikit-learn's inertia."""

import pytest
import torch
from sklearn.cluster import KMeans

from sdzero.segmentation.kmeans import _lloyd, kmeans


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
    x_sq = (x * x).sum(1)
    # The third centre is far from everything, so its cluster starts empty.
    result = _lloyd(x, x_sq, torch.tensor([[0.1], [10.0], [1000.0]]), 10, 0.0, 1024)
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
