"""The examples run and learn (reduced sizes)."""

import importlib.util
import pathlib

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_recommender_learns():
    losses = _load("train_recommender").train(steps=150, batch_size=256, log_every=0)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-20:]) < 0.9 * np.mean(losses[:20])
