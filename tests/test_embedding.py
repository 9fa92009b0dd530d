"""``je.Embedding``: state, lookup, table order and naming, errors, jit behaviour, a full step.

* ``lookup`` equals ``je.embedding_lookup`` on ``emb.embedding_tables(state)`` bit for bit, jitted
  and not, over a structure mixing every input kind.
* Tables are ordered and named with TF's rules (first appearance in ``tf.nest`` order,
  ``table_{i}``); configs are never mutated (unlike TF, pitfall P1).
* Error paths: messages name the argument, the feature path, the id and the range.
* A ``None`` gradient leaf is a zero gradient whose rows are still touched (lazy Adam decays).
* A jitted train step compiles once for batches in the same size bucket, again for another.
* A dense model trained with Optax beside the embedding in one ``jax.jit`` step learns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest

import jaxembed as je

jeo = je.optimizers


def np_init(seed: int = 0, scale: float = 1.0):
    """A table initializer without device computations (keeps tests free of eager compiles)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), dtype)

    return init


def _assert_same_structure_and_bits(got, want):
    """Same nesting, shapes and dtypes, and bit-identical leaves (all mismatches reported)."""
    flat_got, flat_want = ref.flatten_with_paths(got), ref.flatten_with_paths(want)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    mismatches = []
    for (path, g), (_, w) in zip(flat_got, flat_want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, path
        assert g.dtype == w.dtype, path
        if not np.array_equal(g, w):
            diff = g != w
            mismatches.append(
                f"{path}: {diff.sum()}/{diff.size} elements differ, max |diff| "
                f"{np.abs(g - w).max():.3g} (max rel {np.max(np.abs(g - w) / np.abs(w)):.3g})"
            )
    assert not mismatches, "not bit-identical:\n" + "\n".join(mismatches)


# ---------------------------------------------------------------------------------------------
# State


def test_init_state_layout():
    fc = ref.scenario_feature_config()
    emb = je.Embedding(fc, jeo.Adagrad(0.1))
    state = emb.init(jax.random.key(0))
    assert isinstance(state, je.EmbeddingState)
    assert list(state.tables) == ["items", "users", "tags"]  # cand, ctx/0, tags: tf.nest order
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    for table, array in emb.embedding_tables(state).items():
        assert array.shape == (table.vocabulary_size, table.dim)
        assert array.dtype == jnp.float32
        assert state.tables[table.name] is array
        assert list(state.slots[table.name]) == ["accumulators"]
    # TF's default initializer: truncated normal, stddev 1/sqrt(dim), cut at 2 stddev.
    items = np.asarray(state.tables["items"])
    assert np.abs(items).max() <= 2 / np.sqrt(4) + 1e-6
    assert len(np.unique(items)) == items.size


def test_init_is_deterministic_and_uses_table_initializers():
    table = je.TableConfig(5, 3, initializer=jax.nn.initializers.constant(0.25), name="t")
    other = je.TableConfig(7, 2, name="u")
    emb = je.Embedding({"a": je.FeatureConfig(table), "b": je.FeatureConfig(other)})
    s1, s2 = emb.init(jax.random.key(3)), emb.init(jax.random.key(3))
    np.testing.assert_array_equal(s1.tables["t"], np.full((5, 3), 0.25, np.float32))
    np.testing.assert_array_equal(s1.tables["u"], s2.tables["u"])
    assert s1.slots == {
        "t": {},
        "u": {},
    }  # no optimizer: parameters only (TF test_cpu_no_optimizer)


# ---------------------------------------------------------------------------------------------
# lookup == embedding_lookup, bit for bit


def _lookup_case(seed: int):
    """The mixed scenario plus long unweighted sparse rows (block summation order) and a deeper
    nesting, with unnamed extra features."""
    fc = ref.scenario_feature_config()
    tags, users = fc["tags"].table, fc["friends"].table
    fc["long"] = je.FeatureConfig(tags)
    fc["unsafe"] = je.FeatureConfig(users, validate_weights_and_indices=False)
    fc["deep"] = {"z": [je.FeatureConfig(tags, output_shape=(2, 2))], "a": je.FeatureConfig(users)}
    rng = np.random.default_rng(seed)
    inputs, weights = ref.scenario_batch(rng)
    long_rows = [list(rng.integers(0, 12, int(n))) for n in (25, 9, 0, 17)]
    inputs["long"] = je.Sparse(*ref._sparse(long_rows, 25))
    inputs["unsafe"] = je.Sparse([[0, 0], [0, 1], [2, 3]], [1, 1, 9], [4, 4])
    inputs["deep"] = {
        "z": [je.Ragged.from_row_lengths(rng.integers(0, 12, 7), [3, 0, 4, 0])],
        "a": np.array([[1, 2], [3, 3], [0, 9], [5, 5]]),
    }
    weights["long"] = None
    weights["unsafe"] = je.Sparse([[0, 0], [0, 1], [2, 3]], np.float32([0.5, 2.0, -1.0]), [4, 4])
    weights["deep"] = {"z": [None], "a": None}
    return fc, inputs, weights


@pytest.mark.parametrize(
    "seed, jit", [(0, False), (0, True), (1, True)], ids=["0-eager", "0-jit", "1-jit"]
)
def test_lookup_equals_embedding_lookup_bit_for_bit(seed, jit):
    """Against eager ``embedding_lookup`` (TF's bits, tested elsewhere), jitted lookup included."""
    fc, inputs, weights = _lookup_case(seed)
    emb = je.Embedding(fc, jeo.SGD(0.1))
    state = emb.init(jax.random.key(seed))
    want = je.embedding_lookup(inputs, weights, emb.embedding_tables(state), fc)
    batch = emb.preprocess(inputs, weights)
    lookup = jax.jit(emb.lookup) if jit else emb.lookup
    _assert_same_structure_and_bits(lookup(state, batch), want)


def test_jitted_lookup_equals_jitted_embedding_lookup_bit_for_bit():
    """Like for like: both jitted (the same XLA rewrites apply to both)."""
    fc, inputs, weights = _lookup_case(0)
    emb = je.Embedding(fc, jeo.SGD(0.1))
    state = emb.init(jax.random.key(0))
    want = jax.jit(lambda tables: je.embedding_lookup(inputs, weights, tables, fc))(
        emb.embedding_tables(state)
    )
    _assert_same_structure_and_bits(
        jax.jit(emb.lookup)(state, emb.preprocess(inputs, weights)), want
    )


def test_lookup_after_training_and_preprocess_rejects_a_subset_of_features():
    """Like TF's ``TPUEmbedding.enqueue``, preprocess takes every feature (a subset is an error
    naming the missing paths; ``embedding_lookup`` takes subsets)."""
    fc, inputs, weights = _lookup_case(2)
    emb = je.Embedding(fc, jeo.Adagrad(0.5))
    state = emb.init(jax.random.key(0))
    subset = {"ctx": inputs["ctx"], "friends": inputs["friends"]}
    with pytest.raises(ValueError, match=r"missing features \['cand', 'clicks'"):
        emb.preprocess(subset)
    batch = emb.preprocess(inputs, weights)
    grads = ref.random_grads(np.random.default_rng(0), inputs, fc)
    state = jax.jit(emb.apply_gradients)(state, batch, grads)
    assert int(state.step) == 1
    want = je.embedding_lookup(inputs, weights, emb.embedding_tables(state), fc)
    _assert_same_structure_and_bits(emb.lookup(state, batch), want)


def test_lookup_of_tf_serving_fixture(serving):
    """TF's golden outputs (tf_semantics.md 7.1) through Embedding.lookup."""
    video, user = serving.table_video, serving.table_user
    fc = serving.feature_config
    emb = je.Embedding(fc)
    tables = {"video": serving.tables[video], "user": serving.tables[user]}
    state = je.EmbeddingState(tables, {"video": {}, "user": {}}, jnp.zeros((), jnp.int32))
    acts = emb.lookup(state, emb.preprocess(serving.sparse()))
    np.testing.assert_array_equal(
        acts[0], [[0, 1, 2, 3], [4, 6, 8, 10], [4, 6, 8, 10], [4, 5, 6, 7]]
    )
    np.testing.assert_array_equal(
        acts[1], [[4, 6, 8, 10], [4, 5, 6, 7], [0, 1, 2, 3], [4, 6, 8, 10]]
    )
    np.testing.assert_array_equal(acts[2], [[6, 7], [2, 3], [6, 7], [2, 3]])


# ---------------------------------------------------------------------------------------------
# Table order and naming; configs never mutated


def test_tables_ordered_by_first_appearance_and_named_table_i():
    t_b, t_a, t_named, t_last = (
        je.TableConfig(3, 2, initializer=np_init()),
        je.TableConfig(4, 2, initializer=np_init()),
        je.TableConfig(5, 2, initializer=np_init(), name="explicit"),
        je.TableConfig(6, 2, initializer=np_init()),
    )
    fc = {
        "b": je.FeatureConfig(t_b),
        "a": [je.FeatureConfig(t_a), je.FeatureConfig(t_b)],
        "c": (
            je.FeatureConfig(t_named),
            {"y": je.FeatureConfig(t_last), "x": je.FeatureConfig(t_a)},
        ),
    }
    # tf.nest order: a/0 (t_a), a/1 (t_b), b (t_b), c/0 (t_named), c/1/x (t_a), c/1/y (t_last)
    emb = je.Embedding(fc, jeo.Adam(0.1))
    state = emb.init(jax.random.key(0))
    assert list(emb.embedding_tables(state)) == [t_a, t_b, t_named, t_last]
    assert list(state.tables) == ["table_0", "table_1", "explicit", "table_3"]
    assert list(state.slots) == list(state.tables)
    assert list(emb.slot_variables(state)) == [t_a, t_b, t_named, t_last]
    assert emb.embedding_tables(state)[t_a].shape == (4, 2)


def test_table_order_and_names_match_tf():
    tf = pytest.importorskip("tensorflow")
    tfe = tf.tpu.experimental.embedding
    sizes = [(3, 2, None), (4, 2, None), (5, 2, "explicit"), (6, 2, None)]
    ours = [je.TableConfig(v, d, np_init(), name=n) for v, d, n in sizes]
    theirs = [tfe.TableConfig(v, d, name=n) for v, d, n in sizes]

    def structure(tables, feature):
        t0, t1, t2, t3 = tables
        return {
            "z": feature(t0),
            "m": [feature(t1), {"q": feature(t3), "p": feature(t2)}],
            "a": feature(t1),
        }

    emb = je.Embedding(structure(ours, je.FeatureConfig), jeo.SGD(0.1))
    mid_level = tfe.TPUEmbeddingForServing(structure(theirs, tfe.FeatureConfig), tfe.SGD(0.1))
    tf_order = [(t.vocabulary_size, t.name) for t in mid_level.embedding_tables]
    state = emb.init(jax.random.key(0))
    assert [
        (t.vocabulary_size, name)
        for t, name in zip(emb.embedding_tables(state), state.tables, strict=True)
    ] == tf_order


def test_explicit_table_0_name_does_not_clash_with_generated_names():
    t0, t1 = je.TableConfig(3, 2, np_init(), name="table_0"), je.TableConfig(4, 2, np_init())
    emb = je.Embedding({"a": je.FeatureConfig(t0), "b": je.FeatureConfig(t1)})
    assert list(emb.init(jax.random.key(0)).tables) == ["table_0", "table_1"]


@pytest.mark.parametrize(
    "tables",
    [
        lambda: (je.TableConfig(3, 2, name="same"), je.TableConfig(4, 2, name="same")),
        lambda: (je.TableConfig(3, 2, name="table_1"), je.TableConfig(4, 2)),  # generated clash
    ],
    ids=["explicit_duplicates", "explicit_vs_generated"],
)
def test_duplicate_table_names_raise(tables):
    t0, t1 = tables()
    with pytest.raises(ValueError, match="unique name"):
        je.Embedding({"a": je.FeatureConfig(t0), "b": je.FeatureConfig(t1)}, jeo.SGD(0.1))


def test_configs_are_never_mutated():
    init = np_init()
    t0, t1 = je.TableConfig(6, 2, init), je.TableConfig(5, 3, init, combiner="sum")
    fc = {"a": je.FeatureConfig(t0), "b": [je.FeatureConfig(t1)]}
    before = (repr(t0), repr(t1), repr(fc))
    emb = je.Embedding(fc, jeo.SGD(0.1))
    state = emb.init(jax.random.key(0))
    inputs = {"a": np.array([0, 1]), "b": [je.Ragged.from_row_lengths([1, 2], [1, 1])]}
    batch = emb.preprocess(inputs)
    state = jax.jit(emb.apply_gradients)(state, batch, jax.jit(emb.lookup)(state, batch))
    assert (repr(t0), repr(t1), repr(fc)) == before
    assert t0.name is None and t0.optimizer is None and t1.name is None
    # TF pitfall P1 does not happen: a second Embedding with another optimizer gets its slots.
    emb2 = je.Embedding(fc, jeo.Adagrad(0.1))
    assert list(emb2.slot_variables(emb2.init(jax.random.key(0)))[t0]) == ["accumulators"]


def test_table_optimizer_overrides_the_global_one():
    t_own = je.TableConfig(4, 2, np_init(), optimizer=jeo.FTRL(0.1), name="own")
    t_global = je.TableConfig(4, 2, np_init(), name="global")
    emb = je.Embedding({"a": je.FeatureConfig(t_own), "b": je.FeatureConfig(t_global)}, jeo.Adam())
    slots = emb.slot_variables(emb.init(jax.random.key(0)))
    assert list(slots[t_own]) == ["accumulators", "linears"]
    assert list(slots[t_global]) == ["momenta", "velocities"]


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "optimizer, extra",
    [
        (optax.adam(0.1), "from_optax"),
        (optax.sgd(0.1), "from_optax"),
        ("sgd", None),
        (0.1, None),
    ],
    ids=["optax_adam", "optax_sgd", "string", "float"],
)
def test_unsupported_optimizer_raises(optimizer, extra):
    table = je.TableConfig(4, 2)
    with pytest.raises(ValueError, match="unsupported optimizer") as info:
        je.Embedding({"a": je.FeatureConfig(table)}, optimizer)
    if extra:
        assert extra in str(info.value)
    own = je.TableConfig(4, 2, optimizer=optimizer)
    with pytest.raises(ValueError, match="unsupported optimizer"):
        je.Embedding({"a": je.FeatureConfig(own)}, jeo.SGD(0.1))


def test_tf_optimizer_objects_are_unsupported():
    tf = pytest.importorskip("tensorflow")
    table = je.TableConfig(4, 2)
    with pytest.raises(ValueError, match="unsupported optimizer"):
        je.Embedding({"a": je.FeatureConfig(table)}, tf.tpu.experimental.embedding.SGD(0.1))


def _error_emb():
    items = je.TableConfig(16, 4, np_init(), name="items")
    users = je.TableConfig(10, 2, np_init(), combiner="sum", name="users")
    fc = {
        "dense": je.FeatureConfig(items),
        "ctx": (je.FeatureConfig(users, name="friends"),),
        "sp": je.FeatureConfig(items),
        "unsafe": je.FeatureConfig(items, validate_weights_and_indices=False),
    }
    return je.Embedding(fc, jeo.Adagrad(0.1))


def _error_inputs(**given):
    """Valid inputs for every feature of ``_error_emb`` (preprocess takes them all, as TF's
    ``TPUEmbedding.enqueue`` does), with ``given`` replacing some."""
    inputs = {
        "dense": np.array([1, 2]),
        "ctx": (je.Ragged.from_row_lengths([1, 3], [1, 1]),),
        "sp": je.Sparse([[0, 0], [1, 0]], [1, 2], [2, 2]),
        "unsafe": je.Sparse([[0, 0], [1, 0]], [3, 4], [2, 2]),
    }
    return {**inputs, **given}


@pytest.mark.parametrize(
    "inputs, path, bad, vocab",
    [
        ({"dense": np.array([[1, 16], [2, 3]])}, "dense", 16, 16),
        ({"dense": np.array([3, -1])}, "dense", -1, 16),
        ({"ctx": (je.Ragged.from_row_lengths([1, 10, 2], [2, 1]),)}, "ctx/0", 10, 10),
        ({"ctx": (je.Ragged.from_row_lengths([1, -2, 2], [2, 1]),)}, "ctx/0", -2, 10),
        ({"sp": je.Sparse([[0, 0], [1, 0]], [3, 99], [2, 2])}, "sp", 99, 16),
        ({"unsafe": je.Sparse([[0, 0], [1, 0]], [-5, 1], [2, 2])}, "unsafe", -5, 16),
    ],
    ids=[
        "dense_too_big",
        "dense_negative",
        "ragged_too_big",
        "ragged_negative",
        "sparse",
        "sparse_unsafe_negative",
    ],
)
def test_preprocess_rejects_out_of_range_ids(inputs, path, bad, vocab):
    emb = _error_emb()
    with pytest.raises(ValueError) as info:
        emb.preprocess(_error_inputs(**inputs))
    message = str(info.value)
    assert repr(path) in message or path in message
    assert str(bad) in message
    assert f"[0, {vocab})" in message


def test_preprocess_prunes_negative_sparse_ids_on_the_safe_path():
    emb = _error_emb()
    emb.preprocess(_error_inputs(sp=je.Sparse([[0, 0], [1, 0]], [-3, 1], [2, 2])))


def _grad_case():
    emb = _error_emb()
    inputs = _error_inputs(
        dense=np.array([1, 2, 2]), ctx=(je.Ragged.from_row_lengths([1, 3, 3], [2, 1]),)
    )
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess(inputs)
    return emb, state, batch, emb.lookup(state, batch)


@pytest.mark.parametrize(
    "make_grads, error",
    [
        (lambda a: {"dense": a["dense"]}, ValueError),  # missing feature
        (lambda a: {**a, "bogus": jnp.zeros((3, 4))}, ValueError),  # extra feature
        (lambda a: {**a, "ctx": {"x": a["ctx"][0]}}, TypeError),  # a dict for a tuple
        (lambda a: [a["dense"], a["ctx"]], TypeError),  # a list instead of a dict (as TF)
    ],
    ids=["missing", "extra", "renamed", "list"],
)
def test_apply_gradients_rejects_wrong_structure(make_grads, error):
    emb, state, batch, acts = _grad_case()
    with pytest.raises(error, match="structure"):
        emb.apply_gradients(state, batch, make_grads(acts))


@pytest.mark.parametrize(
    "make_grads, path, shape",
    [
        (lambda a: {**a, "dense": jnp.zeros((3, 5))}, "dense", "(3, 5)"),
        (lambda a: {**a, "ctx": (jnp.zeros((2, 1, 2)),)}, "ctx/0", "(2, 1, 2)"),
        (lambda a: {**a, "dense": jnp.zeros((4,))}, "dense", "(4,)"),
    ],
    ids=["wrong_dim", "extra_axis", "wrong_rank"],
)
def test_apply_gradients_rejects_wrong_shape(make_grads, path, shape):
    emb, state, batch, acts = _grad_case()
    with pytest.raises(ValueError) as info:
        emb.apply_gradients(state, batch, make_grads(acts))
    assert path in str(info.value) and shape in str(info.value)
    with pytest.raises(ValueError):
        jax.jit(emb.apply_gradients)(state, batch, make_grads(acts))


def test_apply_gradients_without_optimizer_raises():
    table = je.TableConfig(4, 2, np_init(), name="t")
    emb = je.Embedding({"a": je.FeatureConfig(table)})
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess({"a": np.array([1, 2])})
    acts = emb.lookup(state, batch)  # lookups work without an optimizer
    with pytest.raises(ValueError, match="optimizer"):
        emb.apply_gradients(state, batch, acts)
    # One table without an optimizer is enough to refuse; the message names it.
    other = je.TableConfig(4, 2, np_init(), name="other", optimizer=jeo.SGD(0.1))
    emb = je.Embedding({"a": je.FeatureConfig(table), "b": je.FeatureConfig(other)})
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess({"a": np.array([1]), "b": np.array([2])})
    with pytest.raises(ValueError, match="'t'"):
        emb.apply_gradients(state, batch, emb.lookup(state, batch))


# ---------------------------------------------------------------------------------------------
# A None gradient leaf: zero gradient, rows still touched


def test_none_gradient_leaf_is_zero_gradient_on_touched_rows():
    table = je.TableConfig(10, 3, np_init(), combiner="sum", name="t")
    fc = {"a": je.FeatureConfig(table), "b": je.FeatureConfig(table)}
    optimizer = jeo.Adam(0.1)  # lazy: touched rows decay m and v and move
    emb = je.Embedding(fc, optimizer)
    state = emb.init(jax.random.key(0))
    tables0 = {table: np.asarray(state.tables["t"])}
    trainer = ref.ReferenceTrainer(fc, optimizer, tables0)
    apply = jax.jit(emb.apply_gradients)
    rng = np.random.default_rng(0)
    inputs = {"a": je.Ragged.from_row_lengths([1, 2, 2], [2, 1]), "b": np.array([5, 6])}
    batch = emb.preprocess(inputs)
    steps = [
        {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": np.ones((2, 3), np.float32)},
        {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": None},
    ]
    history = []
    for grads in steps:
        state = apply(state, batch, grads)
        trainer.apply(inputs, None, grads)
        history.append(jax.tree.map(np.asarray, (state.tables["t"], state.slots["t"])))
        np.testing.assert_allclose(state.tables["t"], trainer.tables[table], rtol=1e-4, atol=1e-6)
        for k, v in state.slots["t"].items():
            np.testing.assert_allclose(v, trainer.slots[table][k], rtol=1e-4, atol=1e-6)
    (w1, s1), (w2, s2) = history
    rows = [5, 6]  # only feature "b" uses them; its gradient is None in step 2
    np.testing.assert_allclose(s2["momenta"][rows], 0.9 * s1["momenta"][rows], rtol=1e-6)
    np.testing.assert_allclose(s2["velocities"][rows], 0.999 * s1["velocities"][rows], rtol=1e-6)
    assert np.abs(w2[rows] - w1[rows]).min() > 1e-3  # the weights moved on m alone
    untouched = [0, 3, 4, 7, 8, 9]
    np.testing.assert_array_equal(w2[untouched], tables0[table][untouched])
    np.testing.assert_array_equal(s2["momenta"][untouched], 0)


def test_none_gradient_leaf_leaves_sgd_rows_unchanged():
    table = je.TableConfig(6, 2, np_init(), combiner="sum", name="t")
    fc = {"a": je.FeatureConfig(table), "b": je.FeatureConfig(table)}
    emb = je.Embedding(fc, jeo.SGD(1.0))
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess({"a": np.array([0, 1]), "b": np.array([1, 4])})
    new = emb.apply_gradients(state, batch, {"a": np.ones((2, 2), np.float32), "b": None})
    w0, w1 = np.asarray(state.tables["t"]), np.asarray(new.tables["t"])
    np.testing.assert_array_equal(w1[[2, 3, 4, 5]], w0[[2, 3, 4, 5]])
    np.testing.assert_allclose(w1[[0, 1]], w0[[0, 1]] - 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Compilation: one per size bucket


def _bucket_batch(
    rng, distinct: int, max_len: int, batch: int = 8, vocab: int = 64, min_len: int = 4
):
    lengths = rng.integers(min_len, max_len + 1, batch)
    lengths[rng.integers(batch)] = max_len
    pool = rng.choice(vocab, size=distinct, replace=False)
    ids = np.r_[pool, rng.choice(pool, size=int(lengths.sum()) - distinct)]
    rng.shuffle(ids)
    return {
        "items": je.Ragged.from_row_lengths(ids, lengths),
        "cand": rng.choice(pool, size=batch),  # same table: ids from the same pool
    }


def test_jitted_train_step_compiles_once_per_bucket():
    table = je.TableConfig(128, 4, np_init(scale=0.5), combiner="mean", name="items")
    fc = {"items": je.FeatureConfig(table), "cand": je.FeatureConfig(table)}
    emb = je.Embedding(fc, jeo.Adagrad(0.1))
    traces = []

    @jax.jit
    def train_step(state, batch):
        traces.append(1)
        acts = emb.lookup(state, batch)

        def loss_fn(acts):
            return jnp.sum((acts["items"] * acts["cand"]).sum(-1) - 1.0) ** 2

        loss, grads = jax.value_and_grad(loss_fn)(acts)
        return emb.apply_gradients(state, batch, grads), loss

    rng = np.random.default_rng(0)
    state = emb.init(jax.random.key(0))
    # 5 batches: distinct ids <= 64 -> capacity 64 (the minimum); longest row in (4, 8] -> width 8.
    for distinct, max_len in [(17, 5), (32, 8), (20, 6), (25, 7), (30, 8)]:
        inputs = _bucket_batch(rng, distinct, max_len)
        state, loss = train_step(state, emb.preprocess(inputs))
        assert np.isfinite(float(loss))
    assert len(traces) == 1
    assert train_step._cache_size() == 1
    assert int(state.step) == 5
    # Another bucket (more distinct ids, longer rows) compiles again; so does one with the
    # longer rows but fewer distinct ids.
    state, _ = train_step(state, emb.preprocess(_bucket_batch(rng, 70, 12, vocab=128, min_len=12)))
    assert len(traces) == 2
    state, _ = train_step(state, emb.preprocess(_bucket_batch(rng, 20, 12)))
    assert len(traces) == 3
    assert train_step._cache_size() == 3
    # Back in the first bucket: no new compilation.
    state, _ = train_step(state, emb.preprocess(_bucket_batch(rng, 24, 7)))
    assert len(traces) == 3


# ---------------------------------------------------------------------------------------------
# Embedding + dense model + Optax in one jitted step


def test_embedding_and_dense_model_train_together_in_one_jit():
    vocab, dim, batch_size = 32, 8, 16
    items = je.TableConfig(vocab, dim, np_init(scale=0.35), combiner="mean", name="items")
    fc = {"items": je.FeatureConfig(items)}
    emb = je.Embedding(fc, jeo.Adagrad(0.5))
    rng = np.random.default_rng(0)
    target = rng.normal(size=vocab).astype(np.float32)  # y = mean of the ids' targets

    def make_batch():
        lengths = rng.integers(1, 5, batch_size)
        lengths[0] = 4
        ids = rng.integers(0, vocab, int(lengths.sum()))
        y = np.add.reduceat(target[ids], np.r_[0, np.cumsum(lengths)[:-1]]) / lengths
        return emb.preprocess({"items": je.Ragged.from_row_lengths(ids, lengths)}), y

    batches = [make_batch() for _ in range(4)]
    key = jax.random.key(1)
    params = {"w": 0.1 * jax.random.normal(key, (dim, 1)), "b": jnp.zeros((1,))}
    tx = optax.adam(0.05)

    @jax.jit
    def train_step(state, params, opt_state, batch, y):
        def loss_fn(acts, params):
            pred = (acts["items"] @ params["w"] + params["b"])[:, 0]
            return jnp.mean((pred - y) ** 2)

        acts = emb.lookup(state, batch)
        loss, (g_acts, g_params) = jax.value_and_grad(loss_fn, argnums=(0, 1))(acts, params)
        state = emb.apply_gradients(state, batch, g_acts)
        updates, opt_state = tx.update(g_params, opt_state, params)
        return state, optax.apply_updates(params, updates), opt_state, loss

    state, opt_state = emb.init(jax.random.key(0)), tx.init(params)
    losses = []
    for step in range(30):
        batch, y = batches[step % len(batches)]
        state, params, opt_state, loss = train_step(state, params, opt_state, batch, y)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.3 * np.mean(losses[:4])
    assert int(state.step) == 30
    assert train_step._cache_size() <= len(batches)
