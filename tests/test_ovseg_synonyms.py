"""method.synonyms: ``first`` builds one support set per class from its first prompt name, ``all``
one per name, the class scored by all of them (known answer on the synthetic set: a class whose
synonym is the kite's name takes the kite's pixels)."""

import pytest
import torch
from test_ovseg_no_background import colour_module

import sdzero.segmentation.prototypes as prototypes_module
from datamodules.synthetic_segmentation import SyntheticVOCDataset, write_synthetic_voc
from sdzero.errors import ConfigError
from sdzero.segmentation.synonyms import class_prompts, merge_prototypes

NAMES = ["background", "ball", "box"]
SYNONYMS = [("background",), ("ball", "kite"), ("box",)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synonyms")
    return write_synthetic_voc(root, num_images=3, classes=3, image_size=64)


@pytest.fixture
def builds(monkeypatch):
    calls = []
    original = prototypes_module.prototypes_from_features

    def counted(*args, **kwargs):
        calls.append(kwargs["class_name"])
        return original(*args, **kwargs)

    monkeypatch.setattr(prototypes_module, "prototypes_from_features", counted)
    return calls


@pytest.mark.parametrize("mode", ["first", "all"])
def test_each_synonym_its_support_set_or_the_first(tmp_path, data_root, builds, mode):
    module = colour_module(tmp_path / "cache", synonyms=mode)
    support = data_root / "support"
    segmenter = module.prepare(NAMES, 0, {0}, support, synonyms=SYNONYMS)
    assert sorted(builds) == (["ball", "box", "kite"] if mode == "all" else ["ball", "box"])
    ball = module.prototypes[1]["colour"]
    parts = [module.build_prototypes([n], support)[n]["colour"] for n in SYNONYMS[1]]
    if mode == "all":
        assert len(ball.fg) == len(parts[0].fg) + len(parts[1].fg)
        assert torch.equal(ball.fg, torch.cat([p.fg for p in parts]))
        assert len(ball.support) == 2 * len(parts[0].support)
    else:
        assert torch.equal(ball.fg, parts[0].fg)
    image, label = (SyntheticVOCDataset(data_root, 3)[2][k] for k in ("image", "label"))
    kite = label == 3  # image 2 always shows the kite (class 3 of the 3-class set)
    predicted = segmenter(image, tuple(label.shape)).labels[kite]
    share = (predicted == 1).float().mean()
    if mode == "all":
        assert share > 0.9  # the kite is a "ball" now
    else:
        assert share < 0.1


def test_class_prompts_rules():
    assert class_prompts(NAMES, SYNONYMS, "first", [1, 2]) == {1: ("ball",), 2: ("box",)}
    assert class_prompts(NAMES, SYNONYMS, "all", [1, 2]) == {1: ("ball", "kite"), 2: ("box",)}
    assert class_prompts(NAMES, None, "all", [1]) == {1: ("ball",)}
    with pytest.raises(ValueError, match="'box' would build prototypes for classes 1 and 2"):
        class_prompts(NAMES, [(), ("ball", "box"), ("box",)], "all", [1, 2])
    with pytest.raises(ValueError, match="must be one of"):
        class_prompts(NAMES, None, "every", [1])


def test_merged_support_indices_point_at_the_right_images(tmp_path, data_root):
    module = colour_module(tmp_path)
    built = module.build_prototypes(["ball", "kite"], data_root / "support")
    a, b = built["ball"]["colour"], built["kite"]["colour"]
    merged = merge_prototypes([a, b], "ball")
    rows = slice(len(a.fg), None)
    valid = b.fg_image >= 0
    assert torch.equal(merged.fg_image[rows][valid], b.fg_image[valid] + len(a.support))
    assert [merged.support[i] for i in merged.fg_image[rows][valid]] == [
        b.support[i] for i in b.fg_image[valid]
    ]


def test_a_shared_prompt_name_is_a_config_error(tmp_path, data_root):
    module = colour_module(tmp_path, synonyms="all")
    with pytest.raises(ConfigError, match="method.synonyms=all.*'box'"):
        module.prepare(NAMES, 0, {0}, data_root / "support", [(), ("ball", "box"), ("box",)])
