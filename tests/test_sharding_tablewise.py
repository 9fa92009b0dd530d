"""Table-wise placement: whole tables on one device, stacked by dim and optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxembed as je

N = 8


def _features(opt_b=None):
    a = je.TableConfig(40, 4, combiner="mean", name="a")
    b = je.TableConfig(24, 4, combiner="sum", name="b", optimizer=opt_b)
    c = je.TableConfig(9, 4, combiner="sqrtn", name="c")
    d = je.TableConfig(30, 2, combiner="sum", name="d")
    return {
        "a": je.FeatureConfig(a),
        "a_seq": je.FeatureConfig(a, max_sequence_length=3),
        "b": je.FeatureConfig(b),
        "c": je.FeatureConfig(c),
        "d": je.FeatureConfig(d),
    }


def _batch(rng, batch=16):
    lengths = rng.integers(0, 5, batch)
    n = int(lengths.sum())
    rows = np.repeat(np.arange(batch), lengths)
    cols = np.concatenate([np.arange(k) for k in lengths])
    inputs = {
        "a": je.Ragged.from_row_lengths(rng.integers(0, 40, n), lengths),
        "a_seq": je.Sparse(np.stack([rows, cols], 1), rng.integers(0, 40, n), [batch, 6]),
        "b": je.Sparse(np.stack([rows, cols], 1), rng.integers(0, 24, n), [batch, 6]),
        "c": rng.integers(0, 9, (batch, 2)),
        "d": je.Ragged.from_row_lengths(rng.integers(0, 30, n), lengths),
    }
    weights = {
        "a": je.Ragged.from_row_lengths(rng.uniform(0.5, 2, n).astype(np.float32), lengths),
        "a_seq": None,
        "b": je.Sparse(np.stack([rows, cols], 1), rng.uniform(0.5, 2, n), [batch, 6]),
        "c": None,
        "d": None,
    }
    return inputs, weights


def test_plan_stacks_table_wise_tables_by_dim_and_optimizer():
    mesh = jax.make_mesh((N,), ("x",))
    sharding = {"a": "table", "b": "table", "c": "table", "d": "table"}
    emb = je.Embedding(
        _features(je.optimizers.SGD(0.1)), je.optimizers.Adagrad(0.1), mesh, sharding
    )
    groups = {g: sorted(m.name for m in members) for g, members in emb.plan.groups.items()}
    # b has its own optimizer, d its own dim: three groups.
    assert sorted(groups.values()) == [["a", "c"], ["b"], ["d"]]
    a, c = emb.plan["a"], emb.plan["c"]
    assert a.shard != c.shard  # largest first onto the least loaded device
    assert a.rows_per_shard == 40 and a.offset == 0
    assert "table" in str(emb.plan) and "a_c" in str(emb.plan)


OPTIMIZERS = {
    "sgd": je.optimizers.SGD(0.1),
    "adagrad": je.optimizers.Adagrad(0.1),
    "adagrad_momentum": je.optimizers.AdagradMomentum(0.1, momentum=0.9, use_nesterov=True),
    "adam": je.optimizers.Adam(0.05),
    "adam_dense": je.optimizers.Adam(0.05, lazy_adam=False),
    "ftrl": je.optimizers.FTRL(0.1, l1_regularization_strength=0.001),
    "optax_adam": je.optimizers.from_optax(optax.adam(0.01)),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_table_wise_matches_single_device(optimizer):
    rng = np.random.default_rng(0)
    mesh = jax.make_mesh((N,), ("x",))
    features = _features()
    sharding = {"a": "table", "b": "table", "c": "table", "d": "row"}
    single = je.Embedding(features, optimizer)
    sharded = je.Embedding(features, optimizer, mesh=mesh, sharding=sharding)
    s1, s8 = single.init(jax.random.key(1)), sharded.init(jax.random.key(1))
    for table, value in single.embedding_tables(s1).items():
        np.testing.assert_array_equal(sharded.embedding_tables(s8)[table], value)
    step1, step8 = jax.jit(single.apply_gradients), jax.jit(sharded.apply_gradients)
    for i in range(3):
        inputs, weights = _batch(rng)
        b1, b8 = single.preprocess(inputs, weights), sharded.preprocess(inputs, weights)
        a1, a8 = single.lookup(s1, b1), jax.jit(sharded.lookup)(s8, b8)
        for k in a1:
            if i == 0:
                np.testing.assert_array_equal(a8[k], a1[k], err_msg=k)
            np.testing.assert_allclose(a8[k], a1[k], rtol=1e-5, atol=1e-6, err_msg=k)
        grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), a1)
        s1, s8 = step1(s1, b1, grads), step8(s8, b8, grads)
    for table, value in single.embedding_tables(s1).items():
        np.testing.assert_allclose(
            sharded.embedding_tables(s8)[table], value, rtol=1e-5, atol=1e-6, err_msg=table.name
        )
    slots8 = sharded.slot_variables(s8)
    for table, named in single.slot_variables(s1).items():
        for name, value in named.items():
            np.testing.assert_allclose(slots8[table][name], value, rtol=1e-5, atol=1e-6)


def test_table_wise_table_lives_on_its_device_only():
    mesh = jax.make_mesh((N,), ("x",))
    features = _features()
    emb = je.Embedding(features, je.optimizers.SGD(0.1), mesh, {"a": "table", "c": "table"})
    state = emb.init(jax.random.key(0))
    logical = emb.embedding_tables(state)
    group = state.tables[emb.plan["a"].group]
    for name in ("a", "c"):
        p = emb.plan[name]
        table = logical[next(t for t in logical if t.name == name)]
        for shard in group.addressable_shards:
            device = shard.index[0].start // p.rows_per_shard
            block = np.asarray(shard.data)[p.offset : p.offset + p.vocabulary_size]
            if device == p.shard:
                np.testing.assert_array_equal(block, table)
            else:
                assert shard.data.shape == (p.rows_per_shard, p.dim)
