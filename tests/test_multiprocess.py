"""Scale-out: two CPU processes under ``accelerate launch`` train the same model as one.

Every random draw is made for the global batch from a (seed, step) generator and each
process trains on its slice, so 1 process, 2 processes and 2 accumulation steps see the same
examples, timesteps and noise; only the order of floating-point sums differs.
"""

import pytest

import train

from .conftest import (TINY, TINY_AUTOENCODER, TINY_DREAMBOOTH, accelerate_launch, assert_same_training,
                       assert_two_processes_train_like_one, dreambooth_config, tiny_config)

@pytest.mark.parametrize("config", [TINY, TINY_AUTOENCODER], ids=lambda p: p.stem)
def test_two_processes_train_like_one(tmp_path, fashion_mnist, config):
    assert_two_processes_train_like_one(tmp_path, config)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, trained_tiny_run):
    accumulated = train.train(tiny_config(tmp_path / "accum", train={"grad_accum_steps": 4}))
    assert_same_training(trained_tiny_run, accumulated)


def test_two_processes_learn_a_dreambooth_identifier_like_one(tmp_path, trained_tiny_text_run):
    # the identifier's embedding is a parameter used outside the UNet's forward (through the text encoder)
    overrides = [f"init_from={trained_tiny_text_run}", "subject.learn_identifier=true", "data.flip=false"]
    one = train.train(dreambooth_config(tmp_path / "one", trained_tiny_text_run, subject={"learn_identifier": True},
                                        data={"flip": False}))
    accelerate_launch("train.py", str(TINY_DREAMBOOTH), f"train.output_dir={tmp_path / 'two'}", *overrides)
    assert_same_training(one, tmp_path / "two")
