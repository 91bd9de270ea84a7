"""150 classes: the prototype bank scores in blocks of whole classes within a memory budget and
gives what scoring every prototype at once gives; the CLIP filter's work stays bounded."""

import pytest
import torch
import torch.nn.functional as F

import sdzero.segmentation.filters as filters
from sdzero.segmentation.bank import PrototypeBank, _blocks, rows_per_chunk
from sdzero.segmentation.filters import ClipFilter, subsets
from sdzero.segmentation.prototypes import Prototypes

CLASSES = 150


def random_prototypes(name: str, fg_rows: int, bg_rows: int, gen: torch.Generator) -> Prototypes:
    def side(n):
        return (
            torch.randn(n, 8, generator=gen),
            torch.randint(0, 3, (n,), dtype=torch.int8, generator=gen),
            torch.full((n,), -1),
            torch.zeros(n, 1, 1, dtype=torch.bool),
        )

    fg, fk, fi, fr = side(fg_rows)
    bg, bk, bi, br = side(bg_rows)
    return Prototypes(name, "colour", fg, bg, fk, bk, fi, bi, fr, br, [])


@pytest.fixture(scope="module")
def bank_and_protos():
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 12, (CLASSES, 2), generator=gen).tolist()
    protos = {c + 1: random_prototypes(f"c{c}", f, b % 4, gen) for c, (f, b) in enumerate(counts)}
    return PrototypeBank.build(protos, stuff_threshold=0), protos


def reference(protos, features, kept):
    """Every prototype at once: per kept class the max / argmax of its FG cosines; the max over
    all kept classes' BG rows with its owner and row."""
    f = features.flatten(2).transpose(1, 2)  # (B, hw, D)
    fg_val, fg_arg = [], []
    for c in kept:
        sim = f @ F.normalize(protos[c].fg, dim=-1, eps=1e-6).T
        best = sim.max(-1)
        fg_val.append(best.values)
        fg_arg.append(best.indices)
    rows = [(c, i) for c in kept for i in range(len(protos[c].bg))]
    bg = torch.cat([F.normalize(protos[c].bg, dim=-1, eps=1e-6) for c in kept])
    best = (f @ bg.T).max(-1)
    owner = torch.tensor([rows[i][0] for i in best.indices.flatten().tolist()])
    row = torch.tensor([rows[i][1] for i in best.indices.flatten().tolist()])
    return torch.stack(fg_val, 1), torch.stack(fg_arg, 1), best.values, owner, row


@pytest.mark.parametrize("memory_mb", [1e-4, 0.002, 256])
def test_chunked_scores_equal_scoring_every_prototype_at_once(bank_and_protos, memory_mb):
    bank, protos = bank_and_protos
    assert bank.fg.shape == (sum(len(p.fg) for p in protos.values()), 8)  # one matrix
    features = F.normalize(
        torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(1)), dim=1
    )
    kept = [c for c in protos if c % 3 != 0]
    s = bank.score(features, kept, memory_mb)
    fg_val, fg_arg, bg_val, owner, row = reference(protos, features, kept)
    assert torch.allclose(s.fg.flatten(2), fg_val, atol=1e-6)
    assert torch.equal(s.fg_arg.flatten(2), fg_arg)
    assert torch.allclose(s.bg.flatten(1), bg_val, atol=1e-6)
    assert torch.equal(s.bg_owner.flatten(), owner) and torch.equal(s.bg_arg.flatten(), row)


def test_blocks_hold_whole_classes_within_the_budget():
    cells = 2 * 15
    budget = rows_per_chunk(0.002, cells)  # 2,097 bytes of float32 over 30 cells: 17 rows
    assert budget == 17 and rows_per_chunk(1e-9, cells) == 1
    spans = [(0, 5), (5, 5), (5, 80), (80, 90), (90, 150), (150, 160)]
    blocks = _blocks(spans, budget)
    assert [[j for j, _ in b] for b in blocks] == [[0], [2], [3], [4], [5]]
    for block in blocks:
        rows = sum(b - a for _, (a, b) in block)
        assert rows <= budget or len(block) == 1  # a class larger than the budget is one block
    assert sorted(j for b in blocks for j, _ in b) == [0, 2, 3, 4, 5]  # the empty class: none
    assert _blocks([(0, 3), (3, 6), (6, 9)], 6) == [[(0, (0, 3)), (1, (3, 6))], [(2, (6, 9))]]


class ManyClassClip:
    """Text embeddings from a per-prompt seed (16-d); records the size of every encode call."""

    def __init__(self, image):
        self.image = F.normalize(image, dim=0)
        self.calls = []

    def encode_text(self, prompts):
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            gen = torch.Generator().manual_seed(sum(map(ord, p)) * 31 + len(p))
            out.append(F.normalize(torch.randn(16, generator=gen), dim=0))
        return torch.stack(out)

    def encode_image(self, images):
        return self.image[None]


def test_clip_filter_stays_bounded_at_150_classes(monkeypatch):
    monkeypatch.setattr(filters, "SUBSET_CACHE", 1500)
    clip = ManyClassClip(torch.ones(16))
    names = {i: f"class {i}" for i in range(1, CLASSES + 1)}
    f = ClipFilter(clip, names)
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    for k in range(3):
        clip.image = F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(k)), dim=0)
        kept = f(image)
        assert 1 <= len(kept) <= 10 and set(kept) <= set(names)
    assert max(clip.calls) <= filters.TEXT_BATCH
    assert clip.calls[0] <= CLASSES  # the class prompts, once
    assert sum(clip.calls) <= CLASSES + 3 * 1023  # each image: at most 1,023 subset prompts
    assert len(f._subsets) <= 1500  # the least recently used went out
    with pytest.raises(ValueError, match="at most 12"):
        subsets(list(range(13)))
    with pytest.raises(ValueError, match="topk must lie in"):
        ClipFilter(clip, names, topk=13)


def test_the_150_class_benchmark_is_registered():
    from benchmarks.bench_ovseg import many_class_bank
    from benchmarks.run import all_jobs

    assert {"seg-150", "seg-150-clip-filter"} <= set(all_jobs(quick=True))

    class Extractor:
        name, dim = "dino", 12

    bank = many_class_bank(Extractor())
    assert bank.classes == list(range(150)) and bank.fg.shape == (150 * 65, 12)
    assert bank.fg_counts.unique().tolist() == [65] and bank.bg_counts.unique().tolist() == [65]
