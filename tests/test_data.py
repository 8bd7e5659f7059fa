import numpy as np
import pytest
import torch

from ddpm.data import CLASS_NAMES, class_index, load_fashion_mnist, to_model_space, to_pixels
from ddpm.errors import UserError

from .conftest import write_idx


def test_real_dataset_shapes_and_balance(fashion_mnist):
    assert fashion_mnist.images.shape == (60000, 28, 28)
    assert fashion_mnist.images.dtype == torch.uint8
    assert torch.equal(fashion_mnist.labels.bincount(), torch.full((10,), 6000))
    test = load_fashion_mnist("test", hub_name=None)
    assert test.images.shape == (10000, 28, 28)


def test_model_space_range_padding_and_inverse(fashion_mnist):
    images = fashion_mnist.images[:32]
    x = to_model_space(images)
    assert x.shape == (32, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1  # real images reach pure white
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(x[:, 0, border] == -1), "padding must be black (-1)"
    assert torch.equal(to_pixels(x), images)


def test_flip_mirrors_only_the_chosen_images(fashion_mnist):
    images = fashion_mnist.images[:4]
    flip = torch.tensor([True, False, True, False])
    x, plain = to_model_space(images, flip), to_model_space(images)
    assert torch.equal(x[1], plain[1]) and torch.equal(x[0], plain[0].flip(-1))


def test_idx_folder_via_env_var(fake_idx_dir, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fake_idx_dir))
    data = load_fashion_mnist("train")
    assert data.images.shape == (64, 28, 28) and data.labels[:3].tolist() == [0, 1, 2]


def test_missing_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as e:
        load_fashion_mnist("train", root=str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value)


def test_truncated_idx_file_is_detected(fake_idx_dir):
    path = fake_idx_dir / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((64, 28, 28)), compress=False)
    path.write_bytes(path.read_bytes()[:1000])
    (fake_idx_dir / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_fashion_mnist("train", root=str(fake_idx_dir))


def test_hub_path_through_datasets_load_dataset(tmp_path, monkeypatch):
    """The Hub source, exercised offline on a local parquet dataset with the Hub's columns."""
    import datasets
    from PIL import Image

    from ddpm import data as data_module

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pixels], "label": list(range(10)) + [3, 4]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))}),
    )
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(data_module, "DEBIAN_DIR", tmp_path / "no-debian")
    loaded = load_fashion_mnist("train", hub_name=str(tmp_path))
    assert torch.equal(loaded.images, torch.from_numpy(pixels))
    assert loaded.labels.tolist() == list(range(10)) + [3, 4]


def test_class_names_and_indices():
    assert class_index("ankle boot") == 9 and class_index("9") == 9 and class_index(0) == 0
    with pytest.raises(UserError, match="valid classes: 0='T-shirt/top'"):
        class_index("boot")
    with pytest.raises(UserError):
        class_index(10)
