"""The served SavedModel on random feature configs, against ``je.embedding_lookup``, bit for bit.

``test_lookup_differential.make_case`` builds random nested feature configs (tables shared by
features, the three combiners, sequence features, ``output_shape``); ``test_matches_tf`` checks
``je.embedding_lookup`` on them against TF. Here each config is exported with
``export.save_serving_model`` (about half its non-sequence features weighted), loaded back with
``tf.saved_model.load`` and called through ``serving_default`` with random ragged requests:
empty rows, short rows and rows of up to 90 ids (past TF's ``segment_sum`` packet order, which
the serving graph does not use), random batch sizes and weights of either sign. Every output
must equal ``je.embedding_lookup`` on the same requests bit for bit.

Left out: configs whose root is a single ``FeatureConfig`` (no path to name a signature input:
the export refuses them with an error that says so), clashing table names, and
``output_shape`` features that do not fit the drawn batch size. At least ``MIN_RUN`` run.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from jaxembed.export._saved_model import output_name  # noqa: E402
from test_lookup_differential import make_case  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402

SEEDS, MIN_RUN = range(24), 15


def _request(rng, features, weighted):
    """Random ragged ids (and weights) per feature path: signature inputs and je inputs."""
    batch = int(rng.integers(1, 9))
    signature, ids, weights = {}, {}, {}
    for path, feature in features.items():
        lengths = rng.integers(0, int(rng.choice([3, 20, 90])) + 1, size=batch)
        values = rng.integers(0, feature.table.vocabulary_size, size=int(lengths.sum()))
        signature[export.input_name(path, "ids")] = values
        signature[export.input_name(path, "lengths")] = lengths
        ids[path] = je.Ragged.from_row_lengths(values, lengths)
        if path in weighted:
            w = rng.uniform(-1.0, 3.0, size=values.size).astype(np.float32)
            signature[export.input_name(path, "weights")] = w
            weights[path] = je.Ragged.from_row_lengths(w, lengths)
    return signature, ids, weights


def _nest(feature_config, leaves: dict):
    treedef = jax.tree.structure(feature_config, is_leaf=lambda x: isinstance(x, je.FeatureConfig))
    return jax.tree.unflatten(treedef, list(leaves.values()))


def _serve_and_compare(seed: int, tmp_path) -> bool:
    """Whether the case ran (False: left out, see the module docstring)."""
    case = make_case(seed)
    features = je.lookup.feature_paths(case.feature_config)
    if "" in features:
        return False
    try:
        emb = je.Embedding(case.feature_config, je.optimizers.SGD(0.1))
    except ValueError as err:  # as TF's: unnamed tables are named table_<i>, and may clash
        if "unique name" not in str(err):
            raise
        return False
    rng = np.random.default_rng(20_000 + seed)
    weighted = [p for p, f in features.items() if not f.max_sequence_length and rng.random() < 0.5]
    signature, ids, weights = _request(rng, features, weighted)
    tables = {t: case.tables[t] for t in emb.table_names}
    try:
        want = je.embedding_lookup(
            _nest(case.feature_config, ids),
            _nest(case.feature_config, {p: weights.get(p) for p in features}),
            tables,
            case.feature_config,
        )
    except ValueError as err:
        if "Output shape set" not in str(err):
            raise
        return False
    state = emb.state_from_logical({n: np.asarray(tables[t]) for t, n in emb.table_names.items()})
    options = export.ExportOptions(weighted=weighted)
    path = export.save_serving_model(tmp_path / f"m{seed}", emb, state, options=options)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    got = serve(**{k: tf.constant(v) for k, v in signature.items()})
    for feature_path, value in je._nest.flatten_with_paths(want):
        np.testing.assert_array_equal(
            got[output_name(feature_path)].numpy(),
            np.asarray(value),
            err_msg=f"seed {seed}, feature {feature_path!r}",
        )
    return True


@pytest.mark.filterwarnings("ignore:max_sequence_length")
def test_served_model_equals_the_lookup_on_random_configs(tmp_path):
    ran = sum(_serve_and_compare(seed, tmp_path) for seed in SEEDS)
    assert ran >= MIN_RUN, f"only {ran} of {len(SEEDS)} seeds ran"
