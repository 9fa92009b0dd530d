"""Checkpoints of tables too large for one device: ``save`` writes, and ``restore`` reads,
logical-order arrays split over the devices of each table's shard axes
(``Embedding.logical_arrays``, ``Embedding.logical_sharding``), and the relayout between them
and the physical arrays moves rows between devices (``all_to_all``) instead of giving every
device the whole table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxembed as je
from jaxembed.embedding import _table_initializer
from jaxembed.sharding import spread_sharding

AXIS_TYPES = [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit]


def _mesh(axis_type):
    return jax.make_mesh((2, 4), ("a", "b"), axis_types=(axis_type, axis_type))


def _embedding(mesh, strategy, vocabulary=1 << 14, optimizer=None, table_axes=None):
    table = je.TableConfig(vocabulary, 64, name="t")
    return je.Embedding(
        {"f": je.FeatureConfig(table)},
        optimizer or je.optimizers.Adagrad(0.1),
        mesh=mesh,
        sharding={"t": strategy},
        table_axes=table_axes,
    )


def test_spread_sharding_splits_the_dimension_the_mesh_divides():
    mesh = _mesh(jax.sharding.AxisType.Auto)
    assert spread_sharding(mesh, (1_000_000, 64)).spec == P(("a", "b"), None)
    assert spread_sharding(mesh, (1_000_003, 64)).spec == P(None, ("a", "b"))  # a prime V
    assert spread_sharding(mesh, (6, 3)).spec == P(("a",), None)  # 4 does not divide 6
    assert spread_sharding(mesh, (1_000_003, 5)).spec == P()  # nothing divides: replicated
    assert spread_sharding(mesh, (1_000_000,)).spec == P(("a", "b"))  # a row-wise slot
    assert spread_sharding(mesh, ()).spec == P()
    assert spread_sharding(mesh, (1_000_000, 64), ("b",)).spec == P(("b",), None)  # shard axes


def _per_device_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
@pytest.mark.parametrize("strategy", ["row", "column"])
@pytest.mark.parametrize(
    "table_axes, ways, share", [(None, 8, 1 / 2), (("b",), 4, 1)], ids=["over_8", "over_4_twice"]
)
def test_relayout_never_holds_a_whole_table_on_a_device(
    axis_type, strategy, table_axes, ways, share
):
    """Per device, the compiled relayout (arguments, results and scratch together) takes less
    than ``share`` of what the table and its slot take whole, both ways, and so does
    ``jax.jit(emb.init)``: split over 8 devices (7/16 measured) and over the 4 devices of
    ``"b"``, replicated over ``"a"`` (each device holds 1/4; 0.72-0.88 measured). The jitted
    initializer of eager ``init`` needs its device's share of the table and 3 times that for
    the random bits: 4/8 and 4/4 of one table (measured 0.5002 and 1.0002)."""
    emb = _embedding(_mesh(axis_type), strategy, table_axes=table_axes)
    whole = 2 * (1 << 14) * 64 * 4  # the table and its Adagrad accumulators, float32
    abstract = emb.abstract_state()
    to_logical = jax.jit(emb.logical_arrays).lower(abstract).compile()
    assert _per_device_bytes(to_logical) < whole * share

    def spread(leaf):
        sharding = emb.logical_sharding("t", leaf.shape)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    tables, slots = jax.tree.map(spread, jax.eval_shape(emb.logical_arrays, abstract))
    to_physical = jax.jit(emb.state_from_logical).lower(tables, slots).compile()
    assert _per_device_bytes(to_physical) < whole * share
    init = jax.jit(emb.init).lower(jax.random.key(0)).compile()
    assert _per_device_bytes(init) < whole * share
    # Eager init makes each table with one jitted initializer, split the same way.
    [table] = emb.table_names
    make = _table_initializer(table, "t", emb.logical_sharding("t", (1 << 14, 64)))
    share_of_table = (1 << 14) * 64 * 4 / ways
    assert _per_device_bytes(make.lower(jax.random.key(0)).compile()) < 4.01 * share_of_table


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
@pytest.mark.parametrize("strategy", ["row", "column", "table", "replicated"])
def test_save_and_restore_keep_every_table_split(tmp_path, axis_type, strategy):
    emb = _embedding(_mesh(axis_type), strategy, optimizer=je.optimizers.RowWiseAdagrad(0.1))
    state = emb.init(jax.random.key(0))
    batch = emb.preprocess({"f": np.arange(16).reshape(8, 2) * 97 % (1 << 14)})
    state = emb.apply_gradients(state, batch, {"f": np.ones((8, 2, 64), np.float32)})

    tables, slots = emb.logical_arrays(state)
    for leaf in (tables["t"], slots["t"]["accumulators"]):  # [V, 64] and the row-wise [V]
        shards = {s.data.shape for s in leaf.addressable_shards}  # replicated tables too
        assert shards == {(leaf.shape[0] // 8, *leaf.shape[1:])}, shards

    je.checkpoint.save(tmp_path, emb, state, step=1)
    restored = je.checkpoint.restore(tmp_path, emb)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    one = _embedding(None, strategy, optimizer=emb.optimizers["t"])  # onto one device
    [got] = one.embedding_tables(je.checkpoint.restore(tmp_path, one)).values()
    [want] = emb.embedding_tables(state).values()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_vocabulary_the_mesh_does_not_divide_is_split_by_columns(tmp_path):
    emb = _embedding(_mesh(jax.sharding.AxisType.Explicit), "row", vocabulary=1009)
    state = emb.init(jax.random.key(1))
    tables, _ = emb.logical_arrays(state)
    assert {s.data.shape for s in tables["t"].addressable_shards} == {(1009, 8)}
    je.checkpoint.save(tmp_path, emb, state, step=1)
    restored = je.checkpoint.restore(tmp_path, emb)
    np.testing.assert_array_equal(np.asarray(restored.tables["t"]), np.asarray(state.tables["t"]))


def test_init_makes_split_tables_checks_them_and_still_runs_untraceable_initializers():
    mesh = _mesh(jax.sharding.AxisType.Explicit)

    def from_key_value(key, shape, dtype):  # reads the key in numpy: cannot run under jit
        seed = int(jax.random.key_data(key)[-1])
        return np.random.default_rng(seed).normal(size=shape).astype(dtype)

    tables = [
        je.TableConfig(1 << 12, 16, name="default"),
        je.TableConfig(1 << 12, 16, jax.nn.initializers.uniform(0.5), name="uniform"),
        je.TableConfig(50, 4, from_key_value, name="numpy"),
    ]
    features = {t.name: je.FeatureConfig(t) for t in tables}
    emb = je.Embedding(features, mesh=mesh, sharding={"default": "row", "uniform": "row"})
    state = emb.init(jax.random.key(3))
    keys = jax.random.split(jax.random.key(3), len(tables))
    for key, (table, logical) in zip(keys, emb.embedding_tables(state).items(), strict=True):
        want = np.asarray(table.init_table(key, name=table.name))
        np.testing.assert_allclose(np.asarray(logical), want, rtol=1e-6, atol=1e-7)
    assert {s.data.shape for s in state.tables["default"].addressable_shards} == {(512, 16)}
    bad = je.TableConfig(8, 2, lambda key, shape, dtype: jnp.full(shape, jnp.inf, dtype), name="b")
    with pytest.raises(ValueError, match="Table 'b': initializer .* returned NaN or Inf"):
        je.Embedding({"b": je.FeatureConfig(bad)}, mesh=mesh).init(jax.random.key(0))
