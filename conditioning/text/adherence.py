"""Prompt adherence beyond the class: does "a photo of a dark coat" give dark coats?

    python sample.py runs/text_fashion_attributes_quick --sweep 1 3 5 --attributes

**Adherence.** For every class and every attribute word, ``per_prompt`` samples of
``attribute_prompt(class, [word])`` are measured (``attributes.py``, against the medians of the
class asked for): the share that falls in the word's bin is that word's adherence, 50% by
chance. Each attribute's figure averages its two words over the classes whose pairs were seen
in training; the held-out pairs (``captions.HELD_OUT``, never in a training caption) are
reported apart, with three times the samples each. The judge's class accuracy is taken on the
same samples: naming an attribute should not cost the class.

**Composition.** Two words of different attributes, asked for three ways per class: each word's
prompt alone, both prompts composed with weight 1 each, as Liu et al. (2022) give every concept
the full guidance (``TextConditionedLDM.generate_composed``), and one prompt naming both. The
share of samples with *both* attributes is the measure, for every pair of words of two
attributes (``composition_table``).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from ddpm.data import LabelledImages
from ddpm.evaluate import cached_judge, markdown_table
from ddpm.judge import accuracy
from ddpm.plots import rows_of, save_grid

from conditioning.text.attributes import ATTRIBUTES, bins_for
from conditioning.text.captions import HELD_OUT, attribute_prompt, word_attribute

COMPOSED_WEIGHTS = (1.0, 1.0)
WAYS = ("first alone", "second alone", "composed", "one prompt")  # how the two words are asked for


def word_jobs(class_names, per_prompt: int, held_out) -> list[tuple[int, str, int]]:
    """(class, word, samples) for every class and attribute word; held-out pairs get 3x the samples."""
    held = {tuple(pair) for pair in held_out}
    return [(c, word, per_prompt * (3 if (name, word) in held else 1))
            for c, name in enumerate(class_names) for words in ATTRIBUTES.values() for word in words]


def adherence_report(stage, model, per_prompt: int = 10, held_out=HELD_OUT, **settings) -> dict:
    """Adherence per attribute (seen pairs), on the held-out pairs, and the judge's accuracy.
    ``settings``: guidance, scheduler, steps, seed, progress (those of ``stage.generate_prompts``)."""
    names = stage.class_names
    jobs = word_jobs(names, per_prompt, held_out)
    prompts = [attribute_prompt(names[c], [word]) for c, word, k in jobs for _ in range(k)]
    labels = torch.tensor([c for c, _, k in jobs for _ in range(k)])
    images = stage.generate_prompts(model, prompts, **settings)
    measured = bins_for(stage.config.data).bins(images, labels)
    columns = list(ATTRIBUTES)
    held = {tuple(pair) for pair in held_out}
    hits: dict[str, list[torch.Tensor]] = {}
    start = 0
    for c, word, k in jobs:
        attribute = word_attribute(word)
        hit = measured[start : start + k, columns.index(attribute)] == ATTRIBUTES[attribute].index(word)
        key = "held_out" if (names[c], word) in held else attribute
        hits.setdefault(key, []).append(hit.float())
        start += k
    report = {key: torch.cat(v).mean().item() for key, v in hits.items()}
    report["accuracy"] = accuracy(cached_judge(), LabelledImages(images, labels))
    report["n"] = len(images)
    return report


def composition_table(stage, model, per_class: int = 5, weights=COMPOSED_WEIGHTS, **settings) -> list[dict]:
    """``composition_report`` for every pair of words of two different attributes (12 pairs)."""
    pairs = [(w1, w2) for a, b in itertools.combinations(ATTRIBUTES, 2) for w1 in ATTRIBUTES[a] for w2 in ATTRIBUTES[b]]
    return [composition_report(stage, model, per_class, pair, weights=weights, **settings) for pair in pairs]


def composition_report(stage, model, per_class: int, words: tuple[str, str], held_out=HELD_OUT,
                       weights=COMPOSED_WEIGHTS, **settings) -> dict:
    """The share of samples with both ``words``' attributes: each word's prompt alone, the two
    prompts composed with ``weights``, and one prompt naming both; classes with a held-out word
    are left out."""
    names = stage.class_names
    held = {tuple(pair) for pair in held_out}
    classes = [c for c, name in enumerate(names) if not any((name, w) in held for w in words)]
    fitted = bins_for(stage.config.data)
    columns = [list(ATTRIBUTES).index(word_attribute(w)) for w in words]
    targets = torch.tensor([ATTRIBUTES[word_attribute(w)].index(w) for w in words])
    ways = {way: [] for way in WAYS}
    for c in classes:
        one, two, both = (attribute_prompt(names[c], list(ws)) for ws in ([words[0]], [words[1]], words))
        images = {"first alone": stage.generate_prompts(model, [one] * per_class, **settings),
                  "second alone": stage.generate_prompts(model, [two] * per_class, **settings),
                  "composed": stage.generate_composed(model, [one, two], list(weights), per_class, **settings),
                  "one prompt": stage.generate_prompts(model, [both] * per_class, **settings)}
        for way, batch in images.items():
            measured = fitted.bins(batch, torch.full((per_class,), c))[:, columns]
            ways[way].append((measured == targets).all(1).float())
    return {way: torch.cat(v).mean().item() for way, v in ways.items()} | {
        "words": list(words), "weights": list(weights), "n_per_way": per_class * len(classes)}


def attribute_measure(stage, model, scales: list[float | None], out_dir: Path, *, guidance: float | None = None,
                      **settings) -> str:
    """``sample.py --attributes``: adherence at each guidance scale; composition of every pair of words at
    ``guidance`` (default: the run's); ``out_dir``/attributes.json; one contrast grid per attribute ("a dark
    coat" beside "a light coat", the same seeds). Returns the two tables to print."""
    rows = [{"guidance": stage.sampling_settings(guidance=w)["guidance"],
             **adherence_report(stage, model, guidance=w, progress=True, **settings)} for w in scales]
    lines = ["attribute adherence: the share of samples in the asked bin (chance 0.5), and the judge's class "
             "accuracy on the same samples",
             markdown_table(["w", "class accuracy", *ATTRIBUTES, "held-out pairs"],
                            [[f"{r['guidance']:g}", *(f"{r[k]:.3f}" for k in ["accuracy", *ATTRIBUTES, "held_out"])]
                             for r in rows])]
    w = stage.sampling_settings(guidance=guidance)["guidance"]
    pairs = composition_table(stage, model, guidance=w, **settings)
    counts = sorted({p["n_per_way"] for p in pairs})
    lines += [f"composition at w = {w:g}: the share of samples with both words, each prompt alone, the two composed "
              f"(weights {pairs[0]['weights'][0]:g} and {pairs[0]['weights'][1]:g}) and one prompt naming both "
              f"(n = {counts[0]} to {counts[-1]} per cell)",
              markdown_table(["words", *WAYS], [[" + ".join(p["words"]), *(f"{p[way]:.3f}" for way in WAYS)]
                                                for p in pairs])]
    report = {"adherence": rows, "composition": {"guidance": w, "pairs": pairs}}
    (out_dir / "attributes.json").write_text(json.dumps(report, indent=1))
    for attribute, words in ATTRIBUTES.items():
        prompts = [attribute_prompt(name, [word]) for name in stage.class_names for word in words]
        images = torch.cat([stage.generate_prompts(model, [p] * 8, guidance=w, **settings) for p in prompts])
        grid, titles = rows_of(images, prompts, 8)
        save_grid(grid, out_dir / f"attributes_{attribute}.png", titles,
                  title=f"{attribute}: the same seeds, w = {w:g}")
    lines.append(f"wrote {out_dir / 'attributes.json'} and {out_dir / 'attributes_*.png'} (contrast grids, "
                 f"w = {w:g})")
    return "\n".join(lines)
