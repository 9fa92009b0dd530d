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
    "QuantizationConfig",
    "Ragged",
    "Sparse",
    "TableConfig",
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
    assert _params(export.save_serving_model)[:5] == [
        "export_dir",
        "emb",
        "state",
        "model",
        "params",
    ]
