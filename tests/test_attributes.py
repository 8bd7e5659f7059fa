"""Attributes measured from pixels, the captions that name them, and the adherence metric."""

import dataclasses

import pytest
import torch

from conditioning.text.adherence import adherence_report, composition_report, composition_table
from conditioning.text.attributes import ATTRIBUTES, measure, training_bins
from conditioning.text.captions import (HELD_OUT, NAMES, AttributeCaptionTable, CaptionConfig, CaptionTable,
                                        attribute_prompt, caption_table, class_captions, with_attributes)
from ddpm.data import CLASS_NAMES, DataConfig
from ddpm.errors import UserError


def garment(value: int = 200, side: int = 20, checker: bool = False) -> torch.Tensor:
    """uint8 28 x 28: a centred square garment on black, plain or in a checkerboard of value and value/2."""
    image = torch.zeros(28, 28, dtype=torch.uint8)
    top = (28 - side) // 2
    patch = torch.full((side, side), value, dtype=torch.uint8)
    if checker:
        patch[(torch.arange(side)[:, None] + torch.arange(side)) % 2 == 1] = value // 2
    image[top : top + side, top : top + side] = patch
    return image


def test_measurements_of_known_images():
    plain, small, dim, checked = garment(), garment(side=8), garment(value=60), garment(checker=True)
    values = measure(torch.stack([plain, small, dim, checked, torch.zeros(28, 28, dtype=torch.uint8)]))
    torch.testing.assert_close(values[0], torch.tensor([200.0, 400 / 784, 0.0]))
    assert values[1, 1] == pytest.approx(64 / 784) and values[1, 2] == 0
    assert values[2, 0] == pytest.approx(60.0)
    assert values[3, 0] == pytest.approx(150, abs=1) and values[3, 2] > 0.2  # the checkerboard is patterned
    assert values[4].tolist() == [0.0, 0.0, 0.0]  # no garment: zeros, not NaN


def test_bins_split_every_class_in_half(fashion_mnist):
    fitted = training_bins(hub_name=None)
    assert fitted.thresholds.shape == (10, 3)
    bins = fitted.bins(fashion_mnist.images[:20000], fashion_mnist.labels[:20000])
    for c in range(10):
        share = bins[fashion_mnist.labels[:20000] == c].float().mean(0)
        assert ((share > 0.44) & (share < 0.56)).all(), (c, share)
    # and the bins are not the class: their medians differ a lot between classes
    assert fitted.thresholds[:, 1].max() > 2 * fitted.thresholds[:, 1].min()


def test_attribute_words_go_where_english_puts_them():
    assert with_attributes("coat", ["patterned", "dark", "large"]) == "large dark patterned coat"
    assert with_attributes("pair of jeans", ["light"]) == "pair of light jeans"
    assert attribute_prompt("Coat", ["dark"]) == "a photo of a dark coat"
    assert attribute_prompt("Bag", ["light", "large"]) == "a photo of a large light bag"


def test_no_attributes_keeps_the_class_captions():
    table = caption_table(CaptionConfig(), first=("",))
    assert type(table) is CaptionTable
    assert table.prompts[1:] == [c for per_class in class_captions() for c in per_class]


def draw_many(table, labels, bins, seed=0, times=200):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([table.draw(labels, g, bins) for _ in range(times)])


def test_captions_name_only_the_images_own_attributes_and_never_a_held_out_pair():
    config = CaptionConfig(attributes=list(ATTRIBUTES))
    table = AttributeCaptionTable(config, first=("",))
    labels = torch.arange(10).repeat_interleave(8)
    bins = torch.tensor([[(i >> k) & 1 for k in range(3)] for i in range(8)]).repeat(10, 1)  # every combination
    drawn = draw_many(table, labels, bins)
    assert torch.equal(drawn, draw_many(table, labels, bins))  # seeded
    assert not torch.equal(drawn, draw_many(table, labels, bins, seed=1))
    held = {tuple(p) for p in HELD_OUT}
    named_nothing = 0
    for column in range(drawn.shape[1]):
        c, image_bins = labels[column].item(), bins[column]
        names = NAMES[CLASS_NAMES[c]]
        for caption in {table.prompts[i] for i in drawn[:, column].tolist()}:
            assert any(n.removeprefix("pair of ").split()[-1] in caption for n in names), caption
            for k, words in enumerate(ATTRIBUTES.values()):
                assert words[1 - image_bins[k]] not in caption.split(), (caption, image_bins)  # never the other bin
                assert (CLASS_NAMES[c], words[image_bins[k]]) not in held or words[image_bins[k]] not in caption.split()
        named_nothing += sum(not any(w in table.prompts[i].split() for ws in ATTRIBUTES.values() for w in ws)
                             for i in drawn[:, column].tolist())
    assert 0.08 < named_nothing / drawn.numel() < 0.2  # about (1 - p_mention)^3 = 1/8 name only the class


def test_caption_config_is_checked():
    with pytest.raises(UserError, match="unknown captions.attributes"):
        CaptionConfig(attributes=["colour"])
    with pytest.raises(UserError, match="held_out"):
        CaptionConfig(held_out=[["Coat", "tiny"]])


@dataclasses.dataclass
class FakeConfig:
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(hub_name=None))


class FakeStage:
    """Draws a square for each prompt, exactly as asked (``obey``) or the opposite: light, large and
    plain unless a prompt names a word (composed prompts: every word of every prompt)."""

    class_names = CLASS_NAMES
    config = FakeConfig()

    def __init__(self, obey: bool = True):
        self.obey = obey

    def draw(self, words: set[str]) -> torch.Tensor:
        if not self.obey:
            words = {ws[1 - ws.index(w)] for ws in ATTRIBUTES.values() for w in ws if w in words}
        return garment(value=40 if "dark" in words else 250, side=8 if "small" in words else 27,
                       checker="patterned" in words)

    def generate_prompts(self, model, prompts, **settings):
        return torch.stack([self.draw(set(p.split())) for p in prompts])

    def generate_composed(self, model, prompts, weights, n, **settings):
        return torch.stack([self.draw({w for p in prompts for w in p.split()})] * n)


def test_adherence_is_one_for_a_model_that_obeys_and_zero_for_one_that_does_the_opposite(fashion_mnist):
    obeys = adherence_report(FakeStage(), None, per_prompt=2)
    assert {k: obeys[k] for k in [*ATTRIBUTES, "held_out"]} == {k: 1.0 for k in [*ATTRIBUTES, "held_out"]}
    assert obeys["n"] == 10 * 6 * 2 + len(HELD_OUT) * 2 * 2  # held-out pairs get 3x the samples
    contrary = adherence_report(FakeStage(obey=False), None, per_prompt=2)
    assert {k: contrary[k] for k in [*ATTRIBUTES, "held_out"]} == {k: 0.0 for k in [*ATTRIBUTES, "held_out"]}


def test_composition_counts_samples_with_both_words(fashion_mnist):
    report = composition_report(FakeStage(), None, per_class=2, words=("dark", "small"))
    assert report["first alone"] == 0 and report["second alone"] == 0  # the other word is at its default
    assert report["composed"] == 1 and report["one prompt"] == 1
    assert report["n_per_way"] == 2 * 8  # not Sandal ("dark sandal" is held out) nor Bag ("small bag")
    table = composition_table(FakeStage(), None, per_class=1)
    assert len(table) == 12 and all(r["composed"] == 1 for r in table)
