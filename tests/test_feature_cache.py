"""The on-disk feature cache of feature-matching methods: each image computed once, identical
results, corrupt entries rebuilt, concurrent writers, the size bound, and a key that changes with
every input of the features."""

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, fields

import pytest
import torch
from torch import nn

from sdzero.backbones.feature_cache import FeatureCache, MethodFeatureCache
from sdzero.config import compose
from sdzero.correspondence.base import PairInfo
from sdzero.correspondence.matching import FeatureMatching, FeatureSettings
from sdzero.errors import ConfigError
from sdzero.records import read_records
from sdzero.runs import run_eval
from sdzero.settings import build_settings

MAGIC = b"SDZFEAT1\n"


@dataclass(frozen=True)
class ToySettings(FeatureSettings):
    image_size: int = 16
    scale: float = 1.0


class Toy(FeatureMatching):
    """A deterministic feature method (one strided convolution) that counts its extractions."""

    def __init__(self, **settings):
        super().__init__()
        self.settings = build_settings(ToySettings, settings)
        torch.manual_seed(0)
        self.net = nn.Conv2d(3, 8, 4, stride=4)
        self.calls = 0
        self.eval()

    def features(self, images, names, category):
        self.calls += len(images)
        return self.net(images) * self.settings.scale


class SameFeatures(Toy):
    """Another method class (same weights, same features)."""


def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(20, 24), (16, 16), (30, 18), (12, 28)]
    return [
        torch.randint(0, 256, (3, *sizes[i % 4]), generator=g, dtype=torch.uint8) for i in range(n)
    ]


PAIRS = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 3)]
POINTS = torch.tensor([[2.0, 3.0], [10.0, 7.5], [5.0, 11.0]])


def _run(method, images):
    """Predictions of every pair of PAIRS (images repeat across pairs)."""
    return [
        method.predict_pair(images[s], images[t], POINTS, PairInfo(i, "cat", f"im{s}", f"im{t}"))
        for i, (s, t) in enumerate(PAIRS)
    ]


def _entry_ok(path):
    data = path.read_bytes()
    digest, payload = data[len(MAGIC) : len(MAGIC) + 64], data[len(MAGIC) + 64 :]
    return data.startswith(MAGIC) and hashlib.sha256(payload).hexdigest().encode() == digest


def test_each_distinct_image_is_computed_once_and_results_are_identical(tmp_path):
    images = _images()
    plain = Toy()
    reference = _run(plain, images)
    assert plain.calls == 2 * len(PAIRS)

    cached = Toy(feature_cache=str(tmp_path))
    assert [p.tolist() for p in _run(cached, images)] == [p.tolist() for p in reference]
    cache = cached.feature_cache
    assert cached.calls == 4  # N distinct images -> N computations
    assert (cache.misses, cache.hits, cache.rebuilt) == (4, 2 * len(PAIRS) - 4, 0)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 4 and all(_entry_ok(f) for f in files)

    again = Toy(feature_cache=str(tmp_path))  # a later run (or another rank) on the same folder
    assert [p.tolist() for p in _run(again, images)] == [p.tolist() for p in reference]
    assert again.calls == 0 and again.feature_cache.hits == 2 * len(PAIRS)


def test_a_hit_returns_the_stored_tensor_exactly_with_its_dtype(tmp_path):
    cache = FeatureCache(tmp_path, 10**9)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        value = torch.randn(5, 3, 4).to(dtype)
        cache.put(f"k-{dtype}", value[1:3])  # a view: only its elements are stored
        got = cache.get(f"k-{dtype}")
        assert got.dtype == dtype and torch.equal(got, value[1:3])
        assert got.untyped_storage().nbytes() == value[1:3].numel() * value.element_size()


def test_no_cache_while_training(tmp_path):
    method = Toy(feature_cache=str(tmp_path)).train()
    image = torch.rand(1, 3, 16, 16)
    method.image_features(image, "a", "cat")
    method.image_features(image, "a", "cat")
    assert method.calls == 2 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "empty"])
def test_a_corrupt_entry_is_detected_deleted_and_rebuilt(tmp_path, damage, caplog):
    cache = FeatureCache(tmp_path, 10**9)
    value = torch.arange(24.0).view(2, 3, 4)
    cache.put("key", value)
    path = cache.path("key")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "magic":
        data[:4] = b"XXXX"
    else:
        data = b""
    path.write_bytes(bytes(data))

    calls = []
    with caplog.at_level(logging.WARNING):
        got = cache.get_or_compute("key", lambda: calls.append(1) or value.clone())
    assert torch.equal(got, value) and calls == [1]
    assert (cache.rebuilt, cache.misses, cache.hits) == (1, 1, 0)
    assert "unusable" in caplog.text and str(path) in caplog.text
    assert _entry_ok(path)  # rewritten whole
    assert torch.equal(cache.get("key"), value) and cache.hits == 1


def test_an_entry_of_another_key_is_not_served(tmp_path):
    cache = FeatureCache(tmp_path, 10**9)
    cache.put("a", torch.zeros(2))
    os.replace(cache.path("a"), cache.path("b"))  # a whole, valid file under the wrong name
    assert cache.get("b") is None and cache.rebuilt == 1 and not cache.path("b").exists()


def test_the_size_bound_evicts_the_least_recently_used(tmp_path):
    value = torch.zeros(1000)  # ~4 kB an entry
    probe = FeatureCache(tmp_path / "probe", 10**9)
    probe.put("x", value)
    size = probe.path("x").stat().st_size
    cache = FeatureCache(tmp_path / "c", int(3.5 * size))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.pt").write_bytes(b"not an entry" * 1000)  # never touched
    for i, key in enumerate("abc"):
        cache.put(key, value + i)
        os.utime(cache.path(key), ns=(10**18 + i * 10**9,) * 2)  # a before b before c
    assert cache.get("a") is not None  # a hit touches "a": now "b" is the oldest
    cache.put("d", value)
    assert not cache.path("b").exists() and cache.evicted == 1
    assert all(cache.path(k).exists() for k in "acd")
    cache.put("e", value)
    assert not cache.path("c").exists() and cache.evicted == 2
    assert (tmp_path / "c" / "mine.pt").exists()
    entries = [p for p in (tmp_path / "c").glob("*.pt") if p.name != "mine.pt"]
    assert sum(p.stat().st_size for p in entries) <= 3.5 * size


def test_an_entry_deleted_meanwhile_is_a_miss_not_an_error(tmp_path):
    cache = FeatureCache(tmp_path, 10**9)
    cache.put("k", torch.ones(3))
    cache.path("k").unlink()  # another process evicted it
    assert cache.get_or_compute("k", lambda: torch.full((3,), 2.0)).tolist() == [2.0] * 3
    assert (cache.misses, cache.rebuilt) == (1, 0)


WRITER = textwrap.dedent(
    """
    import os, pathlib, sys, time, torch
    from sdzero.backbones.feature_cache import FeatureCache
    folder, bound, rounds, gate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cache = FeatureCache(folder, bound)
    pathlib.Path(gate, str(os.getpid())).touch()  # start together: the writes overlap
    deadline = time.time() + 60
    while len(os.listdir(gate)) < 2 and time.time() < deadline:
        time.sleep(0.01)
    for r in range(rounds):
        for k in range(6):
            value = torch.full((64, 32, 32), float(k))  # the same value for a key in every writer
            cache.put(f"key{k}", value)
            got = cache.get(f"key{k}")
            assert got is None or torch.equal(got, value), (k, got)
    print(cache.hits, cache.misses, cache.rebuilt)
    """
)


@pytest.mark.parametrize("bound", [10**9, 700_000])  # all fit | eviction races too (~262 kB each)
def test_two_processes_writing_the_same_keys_leave_valid_files(tmp_path, bound):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gate = tmp_path.parent / f"{tmp_path.name}-gate"
    gate.mkdir()
    args = [sys.executable, "-c", WRITER, str(tmp_path), str(bound), "15", str(gate)]
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    for out, _ in outs:
        hits, misses, rebuilt = map(int, out.split())
        assert rebuilt == 0 and hits + misses == 90  # a reader never saw a torn entry
    files = sorted(tmp_path.glob("*.pt"))
    assert not list(tmp_path.glob(".*.tmp"))
    assert all(_entry_ok(f) for f in files)
    cache = FeatureCache(tmp_path, bound)
    if bound == 10**9:
        assert len(files) == 6
        assert all(
            torch.equal(cache.get(f"key{k}"), torch.full((64, 32, 32), float(k))) for k in range(6)
        )
    else:
        assert sum(f.stat().st_size for f in files) <= bound


def _key(method, image=None, name="im", category="cat", cache=None):
    ignored = [f.name for f in fields(FeatureSettings)]
    cache = cache or MethodFeatureCache("unused", 1, ignored)
    image = torch.zeros(1, 3, 16, 16) if image is None else image
    return cache.key(method, image, name, category)


def test_the_key_changes_with_every_input_of_the_features():
    base = _key(Toy())
    assert _key(Toy()) == base  # deterministic
    image = torch.zeros(1, 3, 16, 16)
    image[0, 1, 5, 7] = 1 / 255
    changed = {
        "pixels": _key(Toy(), image=image),
        "size": _key(Toy(), image=torch.zeros(1, 3, 8, 8)),
        "dtype of the image": _key(Toy(), image=torch.zeros(1, 3, 16, 16, dtype=torch.float64)),
        "name": _key(Toy(), name="other"),
        "category": _key(Toy(), category="dog"),
        "method class": _key(SameFeatures()),
        "a feature setting": _key(Toy(scale=2.0)),
        "model frame size": _key(Toy(image_size=32)),
        "backbone dtype": _key(Toy().double()),
    }
    moved = Toy()
    with torch.no_grad():
        moved.net.bias[0] += 1e-3  # an optimiser step
    changed["weights"] = _key(moved)
    seeded = Toy()
    seeded.seed = 7
    changed["run seed"] = _key(seeded)
    configured = Toy()
    configured.scheduler = type("Sched", (), {"config": {"beta_end": 0.012, "_x": 1}})()
    other = Toy()
    other.scheduler = type("Sched", (), {"config": {"beta_end": 0.02, "_x": 1}})()
    changed["scheduler config"] = _key(configured)
    assert _key(other) != changed["scheduler config"]
    assert all(key != base for key in changed.values()), [
        k for k, v in changed.items() if v == base
    ]
    assert len(set(changed.values())) == len(changed)

    same = {  # scoring and cache keys do not change features
        "scoring": _key(Toy(pck_threshold="image", pck_alphas=[0.1], pck_inclusive=False)),
        "cache keys": _key(Toy(feature_cache="/somewhere", feature_cache_gb=1.0)),
    }
    assert all(key == base for key in same.values()), same


def test_the_weights_digest_follows_in_place_changes_and_loads():
    cache = MethodFeatureCache("unused", 1, ["feature_cache", "feature_cache_gb"])
    method = Toy()
    first = _key(method, cache=cache)
    with torch.no_grad():
        method.net.weight.mul_(2)
    second = _key(method, cache=cache)
    assert second != first
    method.net.load_state_dict(
        {k: v / 2 if k == "weight" else v for k, v in method.net.state_dict().items()}
    )
    assert _key(method, cache=cache) == first  # back to the first weights: the first key


def test_a_method_may_declare_its_features_ignore_the_category_and_matching_keys():
    class NoCategory(Toy):
        features_use_category = False
        non_feature_keys = ("scale",)

    assert _key(NoCategory(), category="cat") == _key(NoCategory(), category="dog")
    assert _key(NoCategory(scale=2.0)) == _key(NoCategory())


def test_bad_cache_keys_are_config_errors(tmp_path):
    (tmp_path / "f").write_text("")
    for bad, message in (
        ({"feature_cache_gb": 0.0}, "feature_cache_gb must be > 0"),
        ({"feature_cache": ""}, "feature_cache must be a folder"),
        ({"feature_cache": str(tmp_path / "f")}, "is a file"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_settings(ToySettings, bad)


def test_an_evaluation_run_reads_the_cache_and_logs_its_counts(tmp_path, caplog):
    """conv_matcher (random weights) on synthetic pairs: the second run computes nothing."""
    quiet = ["trainer.enable_progress_bar=false", "visuals=0", "logger=none", "data.num_pairs=3"]
    cache = tmp_path / "cache"

    def run(name, *extra):
        with caplog.at_level(logging.INFO, logger="sdzero"):
            caplog.clear()
            run_eval(compose("demo_train", [f"output_dir={tmp_path / name}", *quiet, *extra]))
        records = read_records(tmp_path / name / "predictions" / "rank0.jsonl")
        return {r["index"]: r["pred_kps"] for r in records}, caplog.text

    plain, _ = run("plain")
    first, log1 = run("first", f"method.feature_cache={cache}")
    second, log2 = run("second", f"method.feature_cache={cache}")
    assert plain == first == second and len(plain) == 3
    assert "0 hits, 6 misses (0 corrupt entries rebuilt)" in log1
    assert "6 hits, 0 misses (0 corrupt entries rebuilt)" in log2
    assert len(list(cache.glob("*.pt"))) == 6
