"""The public surface is deliberate: ``jaxembed.__all__`` and ``jaxembed.export.__all__`` are
pinned, every name resolves, public callables carry docstrings, and the documented signatures
of design.md section 3 keep their parameter names."""

from __future__ import annotations

import inspect

import pytest

import jaxembed as je

JAXEMBED = {
    "Batch",
    "Embedding",
    "EmbeddingState",
    "FeatureConfig",
    "Hashing",
    "QuantizationConfig",
    "Ragged",
    "Sparse",
    "TableConfig",
    "Vocabulary",
    "checkpoint",
    "cpu_kernels_status",
    "embedding_lookup",
    "optimizers",
    "prefetch",
}
EXPORT = {
    "ExportOptions",
    "ExportVerificationError",
    "TFModel",
    "UnsupportedPrimitiveError",
    "input_name",
    "load_tf_checkpoint",
    "save_serving_model",
    "save_tf_checkpoint",
    "serialized_examples",
    "tf_optimizer",
    "to_tf",
}


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_jaxembed_all_is_pinned_and_resolves():
    assert set(je.__all__) == JAXEMBED
    for name in je.__all__:
        obj = getattr(je, name)
        assert inspect.getdoc(obj), f"jaxembed.{name} has no docstring"


def test_contract_signatures():
    assert _params(je.Embedding) == [
        "feature_config",
        "optimizer",
        "mesh",
        "sharding",
        "table_axes",
        "nonfinite_gradients",
    ]
    assert _params(je.embedding_lookup) == ["inputs", "weights", "tables", "feature_config"]
    assert _params(je.Embedding.preprocess) == ["self", "inputs", "weights", "batch_size"]
    assert _params(je.Embedding.lookup) == ["self", "state", "batch"]
    assert _params(je.Embedding.apply_gradients) == ["self", "state", "batch", "grads"]
    assert _params(je.checkpoint.save) == ["directory", "emb", "state", "step", "model"]
    assert _params(je.checkpoint.restore)[:3] == ["directory", "emb", "step"]


def test_export_all_is_pinned_and_resolves():
    pytest.importorskip("tensorflow")
    from jaxembed import export

    assert set(export.__all__) == EXPORT
    for name in export.__all__:
        assert inspect.getdoc(getattr(export, name)), f"jaxembed.export.{name} has no docstring"
    assert _params(export.to_tf)[:2] == ["emb", "state"]
    save, load = (
        inspect.signature(export.save_tf_checkpoint),
        inspect.signature(export.load_tf_checkpoint),
    )
    assert list(save.parameters)[:3] == ["prefix", "emb", "state"]
    assert save.parameters["root"].default == "embedding"  # keyword-only addition (issue 18)
    assert save.parameters["root"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(load.parameters)[:2] == ["path", "emb"]
    assert load.parameters["root"].default is None  # None: found in the checkpoint
    assert load.parameters["root"].kind is inspect.Parameter.KEYWORD_ONLY
    assert _params(export.save_serving_model)[:5] == [
        "export_dir",
        "emb",
        "state",
        "model",
        "params",
    ]


def test_rowwise_optimizers_are_public_with_the_pinned_signatures():
    """design.md section 3.1: FBGEMM's row-wise optimizers in ``jaxembed.optimizers``."""
    optimizers = je.optimizers
    assert {"RowWiseAdagrad", "PartialRowWiseAdam"} <= set(optimizers.__all__)
    for name in optimizers.__all__:
        assert inspect.getdoc(getattr(optimizers, name)), f"jaxembed.optimizers.{name}"
    rowwise_adagrad = inspect.signature(optimizers.RowWiseAdagrad).parameters
    assert list(rowwise_adagrad)[:3] == ["learning_rate", "initial_accumulator_value", "epsilon"]
    assert rowwise_adagrad["initial_accumulator_value"].default == 0.0
    assert rowwise_adagrad["epsilon"].default == 1e-8
    adam = inspect.signature(optimizers.PartialRowWiseAdam).parameters
    assert list(adam)[:4] == ["learning_rate", "beta_1", "beta_2", "epsilon"]
    assert [adam[n].default for n in ("beta_1", "beta_2", "epsilon")] == [0.9, 0.999, 1e-8]


def test_raw_id_spellings():
    """design.md section 3.1: raw ids through ``FeatureConfig(vocabulary=...)``."""
    assert "vocabulary" in inspect.signature(je.FeatureConfig).parameters
    assert _params(je.Hashing)[:1] == ["num_bins"]
    assert _params(je.Vocabulary)[:2] == ["keys", "num_oov_buckets"]
    assert inspect.signature(je.Vocabulary).parameters["num_oov_buckets"].default == 1
    assert _params(je.Vocabulary.from_file)[:2] == ["path", "num_oov_buckets"]


CHECKPOINT_ERRORS = {
    "CheckpointError",
    "CheckpointCorruptedError",
    "CheckpointLockedError",
    "CheckpointWriteError",
    "StepExistsError",
}
CHECKPOINT = CHECKPOINT_ERRORS | {
    "save",
    "restore",
    "latest_step",
    "CheckpointManager",
    "DenseModel",
    "restore_model",
    "model_summary",
    "read_config",
    "feature_config_from",
    "config_metadata",
    "optimizer_config",
}


def test_checkpoint_all_is_pinned_and_resolves():
    assert set(je.checkpoint.__all__) == CHECKPOINT
    for name in je.checkpoint.__all__:
        assert inspect.getdoc(getattr(je.checkpoint, name)), f"jaxembed.checkpoint.{name}"


def _public(module) -> list[tuple[str, object]]:
    """``module``'s public names, less submodules and exception classes."""
    named = [(f"{module.__name__}.{n}", getattr(module, n)) for n in module.__all__]
    return [
        (name, obj)
        for name, obj in named
        if not inspect.ismodule(obj)
        and not (inspect.isclass(obj) and issubclass(obj, BaseException))
    ]


def _without_example(modules) -> list[str]:
    return [
        name
        for module in modules
        for name, obj in _public(module)
        if ">>>" not in (inspect.getdoc(obj) or "")
    ]


def test_every_public_name_has_a_runnable_example():
    """Each public class and function shows its use in a doctest (pytest runs them all:
    ``--doctest-modules``); exceptions are exempt."""
    assert _without_example([je, je.optimizers, je.checkpoint]) == []


def test_every_export_name_has_a_runnable_example():
    pytest.importorskip("tensorflow")
    from jaxembed import export

    assert _without_example([export]) == []


def test_the_package_ships_its_type_hints():
    """PEP 561: ``py.typed`` marks jaxembed (and its subpackages) as typed, and the build
    declares it, so type checkers of an installed jaxembed read its annotations."""
    import importlib.resources
    import tomllib
    from pathlib import Path

    assert importlib.resources.files("jaxembed").joinpath("py.typed").is_file()
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["jaxembed"]
