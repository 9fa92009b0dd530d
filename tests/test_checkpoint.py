"""Checkpoints: logical row order, restore onto any device count, clear mismatch errors."""

import jax
import numpy as np
import optax
import pytest

import jaxembed as je


def _features(optimizer_b=None):
    a = je.TableConfig(40, 4, combiner="mean", name="a")
    b = je.TableConfig(24, 4, combiner="sum", name="b", optimizer=optimizer_b)
    c = je.TableConfig(5, 2, combiner="sqrtn", name="c")
    return {
        "a": je.FeatureConfig(a),
        "a_seq": je.FeatureConfig(a, max_sequence_length=3),
        "b": je.FeatureConfig(b),
        "c": je.FeatureConfig(c),
    }


def _batch(seed, batch=16):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 5, batch)
    n = int(lengths.sum())
    rows = np.repeat(np.arange(batch), lengths)
    cols = np.concatenate([np.arange(k) for k in lengths])
    return {
        "a": je.Ragged.from_row_lengths(rng.integers(0, 40, n), lengths),
        "a_seq": je.Sparse(np.stack([rows, cols], 1), rng.integers(0, 40, n), [batch, 6]),
        "b": je.Sparse(np.stack([rows, cols], 1), rng.integers(0, 24, n), [batch, 6]),
        "c": rng.integers(0, 5, batch),
    }


def _mesh(n):
    return None if n is None else jax.sharding.Mesh(np.array(jax.devices()[:n]), ("x",))


SHARDING = {"a": "row", "b": "table"}


# Other layouts: (mesh shape, axes, sharding, table_axes).
LAYOUTS = {
    "2d": ((2, 4), ("data", "model"), {"a": "column", "b": "table"}, None),
    "2d_model": ((2, 4), ("data", "model"), {"a": "row", "b": "column"}, ("model",)),
    "4_column": ((4,), ("x",), {"a": "column", "b": "replicated"}, None),
}


def _emb(devices, optimizer=None, optimizer_b=None):
    features = _features(optimizer_b or je.optimizers.from_optax(optax.adam(0.01)))
    optimizer = optimizer or je.optimizers.Adagrad(0.1)
    if isinstance(devices, str):
        shape, axes, sharding, table_axes = LAYOUTS[devices]
        mesh = jax.sharding.Mesh(
            np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), axes
        )
        return je.Embedding(features, optimizer, mesh, sharding, table_axes)
    mesh = _mesh(devices)
    return je.Embedding(
        features, optimizer, mesh=mesh, sharding=SHARDING if mesh is not None else None
    )


def _train(emb, state, steps):
    step = jax.jit(
        lambda s, b: emb.apply_gradients(s, b, jax.tree.map(lambda a: a + 0.5, emb.lookup(s, b)))
    )
    for i in steps:
        state = step(state, emb.preprocess(_batch(i)))
    return state


def _assert_same(emb1, s1, emb2, s2, exact=True):
    check = (
        np.testing.assert_array_equal
        if exact
        else (
            lambda x, y, err_msg: np.testing.assert_allclose(
                x, y, rtol=1e-5, atol=1e-6, err_msg=err_msg
            )
        )
    )
    t1, t2 = emb1.embedding_tables(s1), emb2.embedding_tables(s2)
    for (c1, v1), (_, v2) in zip(t1.items(), t2.items(), strict=True):
        check(np.asarray(v1), np.asarray(v2), err_msg=c1.name)
    l1, l2 = emb1.logical_slots(s1), emb2.logical_slots(s2)
    for name in l1:
        for x, y in zip(jax.tree.leaves(l1[name]), jax.tree.leaves(l2[name]), strict=True):
            check(np.asarray(x), np.asarray(y), err_msg=name)
    assert int(s1.step) == int(s2.step)


@pytest.mark.parametrize(
    "saved_on,restored_on",
    [
        (8, 2),
        (8, None),
        (None, 8),
        (2, 8),
        ("2d", None),  # a 2-D mesh (column, table-wise) onto one device
        ("2d", "4_column"),  # onto a 1-D mesh of 4 with other strategies
        (None, "2d"),
        ("2d_model", "2d"),  # tables over "model" (replicated over "data") onto all axes
    ],
)
def test_restore_onto_another_device_count_is_bit_identical(tmp_path, saved_on, restored_on):
    saver = _emb(saved_on)
    state = _train(saver, saver.init(jax.random.key(0)), range(2))
    je.checkpoint.save(tmp_path, saver, state, step=2)
    loader = _emb(restored_on)
    restored = je.checkpoint.restore(tmp_path, loader)
    _assert_same(saver, state, loader, restored)
    # Training continued after the restore equals uninterrupted training.
    _assert_same(
        saver,
        _train(saver, state, range(2, 4)),
        loader,
        _train(loader, restored, range(2, 4)),
        exact=False,
    )


def test_latest_step_and_explicit_step(tmp_path):
    emb = _emb(None)
    state = emb.init(jax.random.key(0))
    je.checkpoint.save(tmp_path, emb, state, step=1)
    later = _train(emb, state, range(1))
    je.checkpoint.save(tmp_path, emb, later, step=5)
    assert je.checkpoint.latest_step(tmp_path) == 5
    _assert_same(emb, later, emb, je.checkpoint.restore(tmp_path, emb))
    _assert_same(emb, state, emb, je.checkpoint.restore(tmp_path, emb, step=1))
    with pytest.raises(FileNotFoundError, match="step 3"):
        je.checkpoint.restore(tmp_path, emb, step=3)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        je.checkpoint.restore(tmp_path / "empty", _emb(None))


def test_config_metadata_rebuilds_the_configs(tmp_path):
    emb = _emb(None)
    je.checkpoint.save(tmp_path, emb, emb.init(jax.random.key(0)), step=0)
    meta = je.checkpoint.config_metadata(emb)
    tables = {t["name"]: t for t in meta["tables"]}
    assert tables["a"]["vocabulary_size"] == 40 and tables["a"]["combiner"] == "mean"
    assert tables["a"]["optimizer"] == {
        "class": "Adagrad",
        "args": tables["a"]["optimizer"]["args"],
    }
    assert tables["a"]["optimizer"]["args"]["learning_rate"] == 0.1
    features = {f["path"]: f for f in meta["features"]}
    assert features["a_seq"]["max_sequence_length"] == 3 and features["a_seq"]["table"] == "a"


def test_optimizer_mismatch_needs_reinit_or_tables_only(tmp_path):
    saver = _emb(None)
    state = _train(saver, saver.init(jax.random.key(0)), range(1))
    je.checkpoint.save(tmp_path, saver, state, step=1)
    other = _emb(8, optimizer=je.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match=r"Table 'a'.*Adagrad.*SGD.*reinit_slots=True"):
        je.checkpoint.restore(tmp_path, other)
    for kwargs in ({"reinit_slots": True}, {"tables_only": True}):
        restored = je.checkpoint.restore(tmp_path, other, **kwargs)
        for (c, v1), v2 in zip(
            saver.embedding_tables(state).items(),
            other.embedding_tables(restored).values(),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2), err_msg=c.name)
        assert other.slot_variables(restored)[other.table_configs[0]] == {}


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda: je.TableConfig(41, 4, combiner="mean", name="a"),
            r"Table 'a'.*vocabulary_size=40.*vocabulary_size=41",
        ),
        (lambda: je.TableConfig(40, 8, combiner="mean", name="a"), r"Table 'a'.*dim=4.*dim=8"),
        (
            lambda: je.TableConfig(40, 4, combiner="mean", name="renamed"),
            r"\['a', 'b', 'c'\].*\['b', 'c', 'renamed'\]",
        ),
    ],
    ids=["vocabulary_size", "dim", "names"],
)
def test_mismatched_tables_are_named(tmp_path, change, match):
    saver = _emb(None)
    je.checkpoint.save(tmp_path, saver, saver.init(jax.random.key(0)), step=0)
    features = _features(je.optimizers.from_optax(optax.adam(0.01)))
    a = change()
    features["a"] = je.FeatureConfig(a)
    features["a_seq"] = je.FeatureConfig(a, max_sequence_length=3)
    with pytest.raises(ValueError, match=match):
        je.checkpoint.restore(tmp_path, je.Embedding(features, je.optimizers.Adagrad(0.1)))


def test_manager_keeps_last_n_saves_every_k_and_extra_items(tmp_path):
    emb = _emb(8)
    state = emb.init(jax.random.key(0))
    params = {"dense": {"w": jax.numpy.arange(6.0).reshape(2, 3), "b": jax.numpy.ones(3)}}
    opt_state = optax.adam(1e-3).init(params)
    with je.checkpoint.CheckpointManager(
        tmp_path, emb, max_to_keep=2, save_interval_steps=2, async_save=True
    ) as manager:
        for step in range(7):
            state = _train(emb, state, [step])
            manager.save(step, state, extra={"params": params, "opt": opt_state})
        manager.wait_until_finished()
        assert manager.all_steps() == [4, 6]
    loader = _emb(2)
    with je.checkpoint.CheckpointManager(tmp_path, loader) as manager:
        target = {"params": params, "opt": opt_state}
        restored, extra = manager.restore(extra=target)
    _assert_same(emb, state, loader, restored)
    for x, y in zip(jax.tree.leaves(extra), jax.tree.leaves(target), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(extra) == jax.tree.structure(target)


def test_a_save_killed_part_way_leaves_the_previous_step(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    worker = Path(__file__).parent / "checkpoint_crash_worker.py"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with subprocess.Popen(  # the context closes the pipe
        [sys.executable, str(worker), str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "saved 1"
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until step 2 is being written, then kill it
            if any("tmp" in p.name and p.name.startswith("2") for p in tmp_path.iterdir()):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the save finished before it could be killed"
    assert not (tmp_path / "2").exists()
    table = je.TableConfig(2_000_000, 64, name="big")
    emb = je.Embedding({"f": je.FeatureConfig(table)}, je.optimizers.Adagrad(0.1))
    assert je.checkpoint.latest_step(tmp_path) == 1
    state = je.checkpoint.restore(tmp_path, emb)
    assert int(state.step) == 0 and float(np.abs(np.asarray(state.tables["big"])).max()) == 0.0


def test_learning_rate_may_change_but_ftrl_linears_mode_may_not(tmp_path):
    def emb_with(optimizer):
        return je.Embedding({"c": je.FeatureConfig(je.TableConfig(5, 2, name="c"))}, optimizer)

    saver = emb_with(je.optimizers.FTRL(0.1))
    je.checkpoint.save(tmp_path, saver, saver.init(jax.random.key(0)), step=0)
    je.checkpoint.restore(tmp_path, emb_with(je.optimizers.FTRL(0.5)))  # a new learning rate
    with pytest.raises(ValueError, match=r"Table 'c'.*multiply_linear_by_learning_rate"):
        je.checkpoint.restore(
            tmp_path, emb_with(je.optimizers.FTRL(0.1, multiply_linear_by_learning_rate=True))
        )
