"""Your own images (``data.source``): class folders, ``datasets`` imagefolders with metadata, ``save_to_disk``
datasets and the Hub code path, built in a temporary directory; stage 1, the autoencoder and latent diffusion
trained on them for a few steps, in colour and grayscale; every bad input a one-line error or a counted skip;
the emoji dataset's writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

import train
from ddpm.runs import load_config, load_run
from ddpm.data import DataConfig, load_images, pixel_format
from ddpm.errors import UserError

from .conftest import ROOT, SHARED_MODELS, TINY, TINY_AUTOENCODER, TINY_LATENT, one_line_error, run, tiny_config

SHAPES = {"circle": (220, 30, 30), "square": (30, 30, 220), "triangle": (30, 160, 30)}


def draw_shape(name: str, rng: np.random.Generator, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A coloured shape of class ``name`` at a random place on white, RGB."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(2, min(size) // 3, 2))
    box = [x, y, x + min(size) // 2, y + min(size) // 2]
    if name == "circle":
        draw.ellipse(box, fill=SHAPES[name])
    elif name == "square":
        draw.rectangle(box, fill=SHAPES[name])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=SHAPES[name])
    return image


def class_folders(root: Path, per_class: int = 8, classes=("circle", "square")) -> Path:
    """torchvision's ImageFolder convention: root/CLASS/NN.png."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(name, rng).save(root / name / f"{i:02d}.png")
    return root


def metadata_folder(root: Path, per_class: int = 8, fmt: str = "jsonl", columns=("label", "caption")) -> Path:
    """A ``datasets`` imagefolder: root/images/NN.png and root/metadata.jsonl (or .csv)."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ("circle", "square"):
        for i in range(per_class):
            file = f"images/{name}-{i:02d}.png"
            draw_shape(name, rng).save(root / file)
            row = {"file_name": file, "label": name, "caption": f"a {'red' if name == 'circle' else 'blue'} {name}"}
            rows.append({k: v for k, v in row.items() if k == "file_name" or k in columns})
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        header = list(rows[0])
        (root / "metadata.csv").write_text(",".join(header) + "\n" + "".join(
            ",".join(str(r[k]) for k in header) + "\n" for r in rows))
    return root


def own(path: Path, source: str = "folder", **more) -> dict:
    return {"source": source, "path": str(path), "limit": None, **more}


def overrides(data: dict) -> list[str]:
    return [f"data.{k}={'null' if v is None else v}" for k, v in data.items()]


# -- sources ------------------------------------------------------------------------------


def test_class_folders_give_images_labels_and_names(tmp_path):
    folder = class_folders(tmp_path / "shapes", classes=("square", "circle", "triangle"))
    data = load_images(DataConfig(**own(folder, image_size=16)))
    assert data.images.shape == (24, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.class_names == ("circle", "square", "triangle")  # sorted folder names
    assert data.labels.bincount().tolist() == [8, 8, 8]
    gray = load_images(DataConfig(**own(folder, image_size=24, channels=1)))
    assert gray.images.shape == (24, 24, 24)
    assert data.images.float().mean() > 150, "a shape on white stays mostly white after resizing and cropping"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_with_metadata_gives_labels_and_captions(tmp_path, fmt):
    folder = metadata_folder(tmp_path / "meta", fmt=fmt)
    data = load_images(DataConfig(**own(folder, caption_column="caption", image_size=16)))
    assert data.images.shape == (16, 3, 16, 16) and data.class_names == ("circle", "square")
    assert [data.captions[i] for i in range(len(data)) if data.labels[i] == 0] == ["a red circle"] * 8


def test_save_to_disk_and_hub_datasets(tmp_path):
    """``disk``: what save_to_disk wrote. ``hub``: ``datasets.load_dataset``, offline on a local parquet
    folder with the Hub's layout (online, the same call downloads a named dataset)."""
    import datasets

    rng = np.random.default_rng(2)
    images = [draw_shape(n, rng).convert("L") for n in ("circle", "square") * 5]
    ds = datasets.Dataset.from_dict(
        {"img": images, "kind": [0, 1] * 5},
        features=datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["round", "boxy"])}))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    for source, path in (("disk", tmp_path / "saved"), ("hub", tmp_path / "hub")):
        data = load_images(DataConfig(**own(path, source, label_column="kind", channels=1, image_size=16)))
        assert data.images.shape == (10, 16, 16) and data.class_names == ("round", "boxy"), source
        assert data.labels.tolist() == [0, 1] * 5


def test_mixed_modes_are_converted_and_transparency_is_white(tmp_path):
    folder = tmp_path / "modes" / "things"
    folder.mkdir(parents=True)
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse([8, 8, 24, 24], fill=(200, 0, 0, 255))
    rgba.save(folder / "rgba.png")
    rgba.convert("P").save(folder / "palette.png")
    Image.new("L", (32, 32), 90).save(folder / "gray.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("LA", (32, 32), (0, 0)).save(folder / "transparent-gray.png")
    data = load_images(DataConfig(**own(tmp_path / "modes", image_size=16)))
    assert data.images.shape == (5, 3, 16, 16)
    by_name = dict(zip(sorted(p.name for p in folder.iterdir()), data.images))
    assert by_name["rgba.png"][:, 0, 0].tolist() == [255, 255, 255], "transparent -> white"
    assert by_name["rgba.png"][0, 8, 8] > 150 and by_name["rgba.png"][1, 8, 8] < 60, "the red disc stays red"
    assert by_name["transparent-gray.png"].min() == 255
    assert by_name["cmyk.jpg"][0].float().mean() > 200 and by_name["cmyk.jpg"][1].float().mean() < 60, "CMYK red"


def test_unreadable_files_are_skipped_with_a_count(tmp_path, capsys):
    folder = class_folders(tmp_path / "shapes", per_class=4)
    (folder / "circle" / "notes.png").write_text("not an image")
    good = (folder / "square" / "00.png").read_bytes()
    (folder / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    data = load_images(DataConfig(**own(folder, image_size=16)))
    assert len(data) == 8 and data.labels.bincount().tolist() == [4, 4]
    said = capsys.readouterr().out
    assert "skipped 2 of 10 files" in said and "notes.png" in said


def test_small_images_are_enlarged_with_a_count(tmp_path, capsys):
    folder = tmp_path / "small" / "dots"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 10), (i * 80, 0, 0)).save(folder / f"{i}.png")
    Image.new("RGB", (64, 64)).save(folder / "big.png")
    data = load_images(DataConfig(**own(tmp_path / "small", image_size=32)))
    assert data.images.shape == (4, 3, 32, 32)
    assert "3 of 4 images are smaller than 32 pixels a side and were enlarged" in capsys.readouterr().out


# -- stages on them -----------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 1])
def test_stage1_trains_and_samples_on_a_folder(tmp_path, channels):
    folder = class_folders(tmp_path / "shapes")
    run_dir = train.train(tiny_config(tmp_path / "run", data=own(folder, image_size=16, channels=channels)))
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert recorded["class_names"] == ["circle", "square"]
    out = tmp_path / "grid.png"
    result = run("sample.py", str(run_dir), "--class", "square", "--n", "3", "--out", str(out),
                 "--save-array", str(tmp_path / "s.npy"))
    assert result.returncode == 0, result.stderr
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == ((3, 3, 16, 16) if channels == 3 else (3, 16, 16)) and samples.dtype == np.uint8
    assert Image.open(out).mode in ("RGB", "RGBA")
    assert np.load(tmp_path / "s_labels.npy").tolist() == [1, 1, 1]
    result = run("sample.py", str(run_dir), "--class", "ankle boot")
    one_line_error(result, "valid classes: 0='circle', 1='square'")
    start = tmp_path / "start.png"
    draw_shape("circle", np.random.default_rng(5), size=(70, 60)).convert("RGBA").save(start)
    result = run("sample.py", str(run_dir), "--class", "circle", "--n", "2", "--init-image", str(start),
                 "--strength", "0.5", "--save-array", str(tmp_path / "i.npy"))
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "i.npy").shape[1:] == samples.shape[1:], "img2img starts from the run's image format"


def test_stage1_on_a_metadata_folder_by_its_label_column(tmp_path):
    folder = metadata_folder(tmp_path / "meta")
    run_dir = train.train(tiny_config(tmp_path / "run", data=own(folder, image_size=16)))
    assert (run_dir / "final" / "unet" / "config.json").is_file()
    assert json.loads((run_dir / "final" / "unet" / "config.json").read_text())["in_channels"] == 3


def test_colour_autoencoder_and_latent_diffusion_on_a_folder(tmp_path):
    folder = class_folders(tmp_path / "shapes")
    data = own(folder, image_size=32)
    autoencoder = train.train(tiny_config(tmp_path / "ae", TINY_AUTOENCODER, data=data,
                                          loss={"perceptual_weight": 0.1}))
    assert json.loads((autoencoder / "final" / "vae" / "config.json").read_text())["in_channels"] == 3
    latent = train.train(tiny_config(tmp_path / "latent", TINY_LATENT, data=data,
                                     autoencoder={"source": str(autoencoder)}))
    result = run("sample.py", str(latent), "--class", "all", "--n", "2", "--save-array", str(tmp_path / "l.npy"))
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "l.npy").shape == (4, 3, 32, 32)
    result = run("sample.py", str(autoencoder), "--evaluate", "--n", "8")
    assert result.returncode == 0 and "psnr" in result.stdout, result.stderr
    gray = run("train.py", str(TINY_LATENT), f"train.output_dir={tmp_path / 'gray-on-colour'}",
               f"autoencoder.source={autoencoder}", *overrides({**data, "channels": 1}))
    assert gray.returncode == 0, "a 3-channel autoencoder takes grayscale as three equal channels"


def test_text_to_image_on_captions_and_on_class_names(tmp_path):
    """A text run reads each image's own caption (``data.caption_column``), or its class name without one."""
    from .conftest import TINY_TEXT, make_tiny_clip_folder

    encoder = make_tiny_clip_folder(tmp_path / "clip")
    folder = metadata_folder(tmp_path / "meta")
    autoencoder = train.train(tiny_config(tmp_path / "ae", TINY_AUTOENCODER, data=own(folder, image_size=32)))
    for name, data in (("captions", own(folder, image_size=32, caption_column="caption")),
                       ("class names", own(folder, image_size=32))):
        run_dir = train.train(tiny_config(tmp_path / name, TINY_TEXT, data=data, text_encoder={"source": str(encoder)},
                                          autoencoder={"source": str(autoencoder)}))
        stage, _, _ = load_run(run_dir)
        expected = ["", "a red circle", "a blue square"] if name == "captions" else ["", "circle", "square"]
        assert stage.condition.data_captions().prompts == expected
        result = run("sample.py", str(run_dir), "--prompt", "a blue square", "--n", "2",
                     "--save-array", str(tmp_path / "t.npy"))
        assert result.returncode == 0, result.stderr
        assert np.load(tmp_path / "t.npy").shape == (2, 3, 32, 32)
        assert run("sample.py", str(run_dir), "--class", "circle", "--n", "1").returncode == 0
    with pytest.raises(UserError, match="captions.attributes"):
        load_config({**tiny_config(tmp_path / "x", TINY_TEXT, data=data), "captions": {"attributes": ["size"]}})


def test_the_text_stage_reads_each_images_caption_in_its_batches(tmp_path):
    from .conftest import TINY_TEXT

    folder = metadata_folder(tmp_path / "meta")
    stage, _, _ = load_config(tiny_config(tmp_path / "run", TINY_TEXT, data=own(folder, caption_column="caption")))
    table = stage.condition.data_captions()
    ids = table.ids(["a blue square", "a red circle"])
    assert [table.prompts[i] for i in ids] == ["a blue square", "a red circle"]
    entries = stage.condition.batch_entries({"caption_ids": ids, "labels": torch.tensor([1, 0])},
                                            torch.tensor([False, True]), None, torch.Generator())
    assert entries["captions"].tolist() == [ids[0].item(), 0], "a dropped caption is the null prompt"


@pytest.mark.skipif(not (SHARED_MODELS / "taesd").is_dir(), reason="../shared/models/taesd is not here")
def test_latent_diffusion_on_taesd_in_colour_at_64_pixels(tmp_path):
    from ddpm.metrics import psnr
    from latent.space import LatentSpace, load_autoencoder

    folder = class_folders(tmp_path / "shapes")
    data = own(folder, image_size=64)
    images = load_images(DataConfig(**data)).images
    space = LatentSpace(load_autoencoder(str(SHARED_MODELS / "taesd")), pixels=pixel_format(DataConfig(**data)))
    assert space.latent_shape == (4, 8, 8)
    assert psnr(space.reconstruct(images), images).mean() > 20, "TAESD keeps flat colour shapes"
    latent = train.train(tiny_config(tmp_path / "latent", TINY_LATENT, data=data,
                                     autoencoder={"source": str(SHARED_MODELS / "taesd"),
                                                  "cache_dir": str(tmp_path / "cache")}))
    result = run("sample.py", str(latent), "--class", "circle", "--n", "2", "--save-array", str(tmp_path / "t.npy"))
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "t.npy").shape == (2, 3, 64, 64)


# -- bad input: one line, exit 2, nothing written ----------------------------------------


def assert_nothing_written(run_dir: Path) -> None:
    assert not run_dir.exists() or not any(run_dir.iterdir()), list(run_dir.iterdir())


def test_a_folder_without_images_is_one_line(tmp_path):
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "cats" / "readme.txt").write_text("no pictures here")
    out = tmp_path / "run"
    result = run("train.py", str(TINY), f"train.output_dir={out}", *overrides(own(tmp_path / "empty")))
    one_line_error(result, "holds no images")
    assert_nothing_written(out)
    (tmp_path / "flat").mkdir()
    result = run("train.py", str(TINY), f"train.output_dir={out}", *overrides(own(tmp_path / "flat")))
    one_line_error(result, "class sub-folders")
    unreadable = tmp_path / "broken" / "cats"
    unreadable.mkdir(parents=True)
    (unreadable / "a.png").write_bytes(b"\x89PNG not really")
    result = run("train.py", str(TINY), f"train.output_dir={out}", *overrides(own(tmp_path / "broken")))
    one_line_error(result, "holds no image PIL can read")
    assert_nothing_written(out)
    result = run("train.py", str(TINY), f"train.output_dir={out}", *overrides(own(tmp_path / "nowhere")))
    one_line_error(result, "is not a folder")


def test_a_missing_label_or_caption_column_is_one_line(tmp_path):
    folder = metadata_folder(tmp_path / "meta", columns=("caption",))
    out = tmp_path / "run"
    result = run("train.py", str(TINY), f"train.output_dir={out}", *overrides(own(folder)))
    one_line_error(result, "no column 'label' (data.label_column)", "its columns: image, caption")
    assert_nothing_written(out)
    with pytest.raises(UserError, match="no column 'text' \\(data.caption_column\\)"):
        load_images(DataConfig(**own(folder, label_column=None, caption_column="text")))
    with pytest.raises(UserError, match="no captions"):
        load_images(DataConfig(**own(class_folders(tmp_path / "shapes"), caption_column="caption")))
    one_class = load_images(DataConfig(**own(folder, label_column=None, image_size=16)))
    assert one_class.class_names == ("image",) and one_class.labels.eq(0).all()


def test_fewer_images_than_a_batch_is_one_line(tmp_path):
    folder = class_folders(tmp_path / "shapes", per_class=3)
    out = tmp_path / "run"
    result = run("train.py", str(TINY), f"train.output_dir={out}", *overrides(own(folder, image_size=16)))
    one_line_error(result, "the dataset has 6 examples, fewer than train.batch_size=16")
    assert_nothing_written(out)


def test_another_channel_count_than_the_run_resumed_is_one_line(tmp_path):
    folder = class_folders(tmp_path / "shapes")
    run_dir = train.train(tiny_config(tmp_path / "run", data=own(folder, image_size=16, channels=1)))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = run("train.py", str(run_dir / "config.yaml"), "train.resume=latest", "train.max_steps=12",
                 "data.channels=3")
    one_line_error(result, "does not fit this model")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before, "nothing rewritten"


def test_a_grayscale_autoencoder_refuses_colour_data(tmp_path):
    folder = class_folders(tmp_path / "shapes")
    autoencoder = train.train(tiny_config(tmp_path / "ae", TINY_AUTOENCODER, data=own(folder, channels=1)))
    out = tmp_path / "latent"
    result = run("train.py", str(TINY_LATENT), f"train.output_dir={out}", f"autoencoder.source={autoencoder}",
                 *overrides(own(folder, channels=3)))
    one_line_error(result, "takes 1-channel images and data.channels is 3")
    assert_nothing_written(out)


def test_data_section_mistakes_are_one_line(tmp_path):
    folder = class_folders(tmp_path / "shapes")
    cases = [(["data.channels=3"], "Fashion-MNIST is grayscale"),
             (["data.source=folder"], "needs data.path"),
             ([*overrides(own(folder)), "data.image_size=20"], "multiple of 8"),
             ([*overrides(own(folder)), "data.channels=2"], "1 (grayscale) or 3 (colour)")]
    for args, message in cases:
        one_line_error(run("train.py", str(TINY), f"train.output_dir={tmp_path / 'r'}", *args), message)
    clip = run("train.py", "configs/clip_fashion_tiny.yaml", f"train.output_dir={tmp_path / 'r'}",
               *overrides(own(folder)))
    one_line_error(clip, "a 'clip' run trains on fashion_mnist only so far")


def test_a_recorded_class_list_must_match_the_data(tmp_path):
    folder = class_folders(tmp_path / "shapes")
    with pytest.raises(UserError, match="trained on \\['circle', 'star'\\]"):
        load_images(DataConfig(**own(folder, class_names=["circle", "star"])))


def test_pixel_formats():
    assert pixel_format(DataConfig()).model_shape == (1, 32, 32)
    assert pixel_format(DataConfig(source="hub", path="x/y")).model_shape == (3, 32, 32)
    assert pixel_format(DataConfig(source="disk", path="x", channels=1, image_size=64)).image_shape == (64, 64)


# -- the emoji dataset --------------------------------------------------------------------


def test_emoji_names_and_groups_from_unicode():
    from ddpm.emoji import read_emoji_test, unicode_emoji

    line = "1F34E ; fully-qualified # 🍎 E0.6 red apple"
    (apple,) = read_emoji_test(f"# group: Food & Drink\n# subgroup: food-fruit\n{line}\n1F34E ; unqualified # x\n")
    assert (apple.text, apple.name, apple.group, apple.subgroup) == ("🍎", "red apple", "Food & Drink", "food-fruit")
    every = unicode_emoji(skin_tones=True)
    assert len(every) > 3000 and len(unicode_emoji()) < len(every) / 1.5
    assert {e.group for e in every} >= {"Smileys & Emotion", "Animals & Nature", "Flags"}


def test_emoji_dataset_is_an_imagefolder_with_captions_and_groups(tmp_path):
    from ddpm.emoji import FONT, main

    if not FONT.is_file():
        pytest.skip("fonts-noto-color-emoji is not installed")
    assert main(["--out", str(tmp_path), "--sizes", "16", "32", "--per-group", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "emoji_32" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and rows[0]["caption"] == "grinning face" and rows[0]["label"] == "Smileys & Emotion"
    assert Image.open(tmp_path / "emoji_16" / rows[0]["file_name"]).size == (16, 16)
    data = load_images(DataConfig(**own(tmp_path / "emoji_32", caption_column="caption")))
    assert data.images.shape == (18, 3, 32, 32) and data.captions[0] == "grinning face"
    assert data.labels.bincount().tolist() == [2] * 9
    shipped = (ROOT / "tests" / "data" / "emoji_32" / "metadata.jsonl").read_text()
    assert shipped == (tmp_path / "emoji_32" / "metadata.jsonl").read_text(), "the tests' emoji are these"
    assert not list(tmp_path.glob(".emoji_*")), "no temporary folder left"


# -- the judge on your own labelled images ------------------------------------------------


def test_a_judge_trains_on_any_labelled_folder(tmp_path, capsys):
    from ddpm.judge import load_judge, main

    folder = class_folders(tmp_path / "shapes", per_class=10, classes=tuple(SHAPES))
    config = tmp_path / "shapes.yaml"
    config.write_text(yaml.safe_dump({"stage": "ddpm", "data": own(folder, image_size=16)}))
    assert main(["--config", str(config), "--epochs", "1", "--out", str(tmp_path / "judge.safetensors")]) == 0
    said = capsys.readouterr().out
    assert "held-out accuracy" in said and "on 3 images of 3 classes" in said and "real-vs-real FD" in said
    judge = load_judge(tmp_path / "judge.safetensors")
    assert (judge.channels, judge.size, judge.head.out_features) == (3, 16, 3)
    data = load_images(DataConfig(**own(folder, image_size=16)))
    assert judge(data.images[:4]).shape == (4, 3)
    assert main(["--config", str(config), "--score", str(tmp_path / "judge.safetensors")]) == 0


def test_evaluating_a_run_of_your_own_images_points_to_the_judge(tmp_path):
    folder = class_folders(tmp_path / "shapes")
    run_dir = train.train(tiny_config(tmp_path / "run", data=own(folder, image_size=16)))
    one_line_error(run("sample.py", str(run_dir), "--evaluate", "--n", "4"), "python -m ddpm.judge --config")


def test_web_page_tiles_colour_grids():
    from ddpm.plots import tile

    grid = torch.zeros(2, 3, 3, 16, 16, dtype=torch.uint8)
    grid[0, 1, 0] = 255  # one red image
    page = tile(grid, scale=2, gap=2)
    assert page.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    assert page[2 + 5, 34 + 2 + 5].tolist() == [255, 0, 0] and page[0, 0].tolist() == [96, 96, 96]
    assert tile(grid[:, :, 0]).ndim == 2
