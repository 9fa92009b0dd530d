"""``Embedding.preprocess`` + ``lookup`` against ``je.embedding_lookup``, on random cases.

``test_lookup_differential.make_case`` builds random nested structures of sparse, ragged and
dense features (``test_matches_tf`` checks ``je.embedding_lookup`` on them against TF). Here the
training lookup must give the same bits: on one device, and on an 8-device mesh with each table
placed at random (row, table, column or replicated) and the batch padded to a bucket (padded
examples read zeros).

Cases outside the training path's rules are left out, as ``TPUEmbedding`` refuses them: inputs
covering only part of the feature config, two tables with one name (TF names unnamed tables
``table_<i>``, which may clash with a given name), and dense ids (their
training shapes follow ``TPUEmbedding``, not the serving lookup: ``tpu_dense_shape``); on the mesh
also features whose ``output_shape`` fixes a batch that padding would change. Every block of
seeds must still run at least ``MIN_RUN`` cases.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_lookup_differential import make_case
from tf_reference import flatten_with_paths

import jaxembed as je

BLOCK, BLOCKS, MIN_RUN = 32, 4, 6
LAYOUTS = ("row", "table", "column", "replicated")


def _trainable(case) -> bool:
    leaves = dict(flatten_with_paths(case.inputs))
    features = dict(flatten_with_paths(case.feature_config))
    return set(leaves) == set(features) and all(
        isinstance(x, (je.Sparse, je.Ragged)) for x in leaves.values()
    )


def random_embedding(
    case, devices: int, rng: np.random.Generator, optimizer: je.optimizers.Optimizer
) -> je.Embedding:
    """``case``'s Embedding: on one device, or on a ``devices`` mesh with each table placed at
    random (``rng``) by a layout its vocabulary allows."""
    if devices == 1:
        return je.Embedding(case.feature_config, optimizer)
    names = je.Embedding(case.feature_config, optimizer).table_names  # in table order
    sharding = {
        n: str(rng.choice(LAYOUTS[t.vocabulary_size < devices :])) for t, n in names.items()
    }
    mesh = jax.make_mesh((devices,), ("x",))
    return je.Embedding(case.feature_config, optimizer, mesh=mesh, sharding=sharding)


@pytest.mark.filterwarnings("ignore:max_sequence_length")
@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("block", range(BLOCKS))
def test_training_lookup_equals_the_functional_lookup(block, devices):
    ran = 0
    for seed in range(block * BLOCK, (block + 1) * BLOCK):
        case = make_case(seed)
        if not _trainable(case):
            continue
        want = je.embedding_lookup(case.inputs, case.weights, case.tables, case.feature_config)
        try:
            emb = random_embedding(
                case, devices, np.random.default_rng(seed), je.optimizers.SGD(0.1)
            )
        except ValueError as err:  # as TF's: unnamed tables are named table_<i>, and may clash
            if "unique name" not in str(err):
                raise
            continue
        tables = {n: np.asarray(case.tables[t]) for t, n in emb.table_names.items()}
        state = emb.state_from_logical(tables)
        try:
            batch = emb.preprocess(
                case.inputs, case.weights, batch_size="bucket" if devices > 1 else None
            )
        except ValueError as err:
            if "cannot be padded" not in str(err):
                raise
            continue
        got = dict(flatten_with_paths(jax.jit(emb.lookup)(state, batch)))
        for path, w in flatten_with_paths(want):
            g, w = np.asarray(got[path]), np.asarray(w)
            where = f"seed {seed}, feature {path!r}, {devices} device(s)"
            assert g.shape[1:] == w.shape[1:] and g.shape[0] >= w.shape[0], where
            np.testing.assert_array_equal(g[: w.shape[0]], w, err_msg=where)
            np.testing.assert_array_equal(g[w.shape[0] :], 0, err_msg=f"{where}: padding")
        ran += 1
    assert ran >= MIN_RUN, f"only {ran} of seeds {block * BLOCK}.. ran"
