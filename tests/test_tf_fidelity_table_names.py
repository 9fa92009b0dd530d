"""Duplicate table names: ``Embedding`` raises TF's exact message.

TF (tpu_embedding_base.py and tpu_embedding_v2.py ``__init__``, 2.21): unnamed tables are named
``table_{i}`` in order of first appearance, and a repeated name raises
``ValueError("Tables must have a unique name. Multiple tables with name {name} found.")``
(TF's ``test_tables_with_same_name`` matches 'Multiple tables with name table found.').
"""

from __future__ import annotations

import pytest

import jaxembed as je

tf = pytest.importorskip("tensorflow")
TFE = tf.tpu.experimental.embedding

# Each case: the table names, in feature order (None: unnamed), and which table each feature uses.
CASES = {
    "two_explicit": (["table", "table"], [0, 1]),
    "explicit_clashes_with_default": ([None, "table_0"], [0, 1]),
    "default_clashes_with_explicit": (["table_1", None], [0, 1]),
    "three_tables_last_clashes": (["a", "b", "a"], [0, 1, 2, 1]),
}


def _message(make):
    with pytest.raises(ValueError) as info:
        make()
    return str(info.value)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tf_class", ["TPUEmbedding", "TPUEmbeddingForServing"])
def test_duplicate_table_names_raise_tfs_exact_message(name, tf_class):
    names, uses = CASES[name]

    def tf_make():
        tables = [TFE.TableConfig(4, 2, name=n) for n in names]
        features = tuple(TFE.FeatureConfig(tables[i]) for i in uses)
        getattr(TFE, tf_class)(features, TFE.SGD(0.1))

    def je_make():
        tables = [je.TableConfig(4, 2, name=n) for n in names]
        je.Embedding(tuple(je.FeatureConfig(tables[i]) for i in uses), je.optimizers.SGD(0.1))

    want = _message(tf_make)
    assert want.startswith("Tables must have a unique name. Multiple tables with name ")
    assert _message(je_make) == want


def test_one_table_shared_by_features_is_no_duplicate():
    """Features sharing one TableConfig object share one table (identity, as in TF)."""
    table = je.TableConfig(4, 2, name="t")
    emb = je.Embedding((je.FeatureConfig(table), je.FeatureConfig(table)))
    assert list(emb.table_names.values()) == ["t"]
