"""``export.save_tf_checkpoint`` / ``export.load_tf_checkpoint``: TF embedding checkpoints.

* JAX -> TF: after training with each optimizer (SGD, Adagrad, AdagradMomentum, Adam, FTRL in
  both ``multiply_linear_by_learning_rate`` modes) the checkpoint holds exactly the keys of
  ``tf.train.Checkpoint(embedding=TPUEmbeddingForServing(...))`` (tf_semantics §5.4, escaping
  included) and restores, fully consumed, into ``TPUEmbeddingForServing`` and the legacy
  ``TPUEmbedding`` (CPU, no strategy) built from independent TF configs; every TF variable equals
  ``embedding_tables`` / ``slot_variables``. A sharded state is written in logical row order.
* TF -> JAX: checkpoints written by both TF classes (root ``embedding``, another root name, a
  nested object, ``save()`` into a directory) load exactly, onto one device or an 8-device mesh;
  a training step on the loaded state equals one on ``state_from_logical`` of the same values.
* Round trip JAX -> TF -> JAX is exact for every optimizer; ``tables_only=True`` gives fresh
  slots; Optax optimizers (``from_optax``) write tables only and load with fresh Optax state.
* Errors: a missing table, a wrong shape, missing slots, a missing path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("tensorflow")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import numpy_reference as npref  # noqa: E402
import optax  # noqa: E402
import tensorflow as tf  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import export  # noqa: E402

jeo = je.optimizers
TFE = tf.tpu.experimental.embedding
B = 8  # batch size: one example per device on the 8-device mesh
TRAIN_SEEDS = (3, 4, 5)  # batches of one bucket (and seed 7's): the jitted step compiles once
ITEMS = "shop.items"  # a "." in the name: escaped as ".." in checkpoint keys
NAMES = (ITEMS, "table_1")  # the second table is unnamed: TF's default name
SHAPES = {ITEMS: (40, 4), "table_1": (24, 2)}
SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
TF_CLASSES = {
    "serving": TFE.TPUEmbeddingForServing,
    "legacy": TFE.TPUEmbedding,  # builds on CPU without a TPU strategy (variables only)
}

# name: (jaxembed optimizer, its TF twin written by hand, slot names in TF's order)
OPTIMIZERS: dict[str, tuple[Any, Callable[[], Any], tuple[str, ...]]] = {
    "sgd": (jeo.SGD(0.1), lambda: TFE.SGD(0.1), ()),
    "adagrad": (
        jeo.Adagrad(0.1, initial_accumulator_value=0.2),
        lambda: TFE.Adagrad(0.1, initial_accumulator_value=0.2),
        ("accumulators",),
    ),
    "adagrad_momentum": (
        jeo.AdagradMomentum(0.1, momentum=0.9, use_nesterov=True),
        lambda: TFE.AdagradMomentum(0.1, momentum=0.9, use_nesterov=True),
        ("accumulators", "momenta"),
    ),
    "adam": (jeo.Adam(0.05), lambda: TFE.Adam(0.05), ("momenta", "velocities")),
    "ftrl": (
        jeo.FTRL(0.1, l1_regularization_strength=0.001),
        lambda: TFE.FTRL(0.1, l1_regularization_strength=0.001),
        ("accumulators", "linears"),
    ),
    "ftrl_linear_x_lr": (
        jeo.FTRL(0.1, beta=0.1, multiply_linear_by_learning_rate=True),
        lambda: TFE.FTRL(0.1, beta=0.1, multiply_linear_by_learning_rate=True),
        ("accumulators", "linears"),
    ),
}


def feature_config(items_optimizer: Any = None, vocab: int = 40, name: str = ITEMS) -> dict:
    items = je.TableConfig(vocab, 4, combiner="mean", name=name, optimizer=items_optimizer)
    other = je.TableConfig(24, 2, combiner="sum")  # second in table order: "table_1"
    F = je.FeatureConfig
    return {"a": F(items), "b": [F(other), F(items, max_sequence_length=2)]}


def tf_twin(optimizer: Any, cls: Any = TFE.TPUEmbeddingForServing, items_optimizer=None) -> Any:
    """TF's embedding object for ``feature_config``, from TF configs written independently."""
    items = TFE.TableConfig(40, 4, combiner="mean", name=ITEMS, optimizer=items_optimizer)
    other = TFE.TableConfig(24, 2, combiner="sum")  # TF names it "table_1"
    F = TFE.FeatureConfig
    return cls({"a": F(items), "b": [F(other), F(items, max_sequence_length=2)]}, optimizer)


def expected_keys(slots: dict[str, tuple[str, ...]], root: str = "embedding/") -> set[str]:
    """tf_semantics §5.4: ``<root><table>`` and ``<root><table>.S<slot>``, ``.`` as ``..``."""
    keys = set()
    for table, names in slots.items():
        escaped = table.replace(".", "..")
        keys.add(f"{root}{escaped}{SUFFIX}")
        keys.update(f"{root}{escaped}.S{slot}{SUFFIX}" for slot in names)
    return keys


def checkpoint_keys(path: str) -> dict[str, list[int]]:
    return {k: s for k, s in tf.train.list_variables(path) if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def make_batch(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)

    def ragged(vocab):
        lengths = rng.integers(0, 4, B)
        return je.Ragged.from_row_lengths(rng.integers(0, vocab, int(lengths.sum())), lengths)

    inputs = {"a": ragged(40), "b": [ragged(24), ragged(40)]}
    return inputs, npref.random_grads(rng, inputs, feature_config())


def _mesh() -> jax.sharding.Mesh:
    assert len(jax.devices()) >= 8, "conftest should give JAX 8 CPU devices"
    return jax.make_mesh((8,), ("x",))


@functools.cache
def embedding(name: str) -> je.Embedding:
    return je.Embedding(feature_config(), OPTIMIZERS[name][0])


@functools.cache
def jitted_apply(emb: je.Embedding) -> Callable:
    return jax.jit(emb.apply_gradients)


@functools.cache
def trained(name: str) -> je.EmbeddingState:
    """Three training steps with optimizer ``name`` (the batches share one bucket)."""
    emb = embedding(name)
    state = emb.init(jax.random.key(11))
    for seed in TRAIN_SEEDS:
        inputs, grads = make_batch(seed)
        state = jitted_apply(emb)(state, emb.preprocess(inputs), grads)
    return state


def numpy_tables(emb: je.Embedding, state: je.EmbeddingState) -> dict[str, np.ndarray]:
    return {emb.table_names[t]: np.asarray(v) for t, v in emb.embedding_tables(state).items()}


def numpy_slots(emb: je.Embedding, state: je.EmbeddingState) -> dict[str, dict[str, np.ndarray]]:
    return {
        emb.table_names[t]: {k: np.asarray(v) for k, v in s.items()}
        for t, s in emb.slot_variables(state).items()
    }


def assert_states_equal(emb1, s1, emb2, s2) -> None:
    """Tables, every logical slot leaf (Optax state included) and step, bit for bit."""
    t1, t2 = numpy_tables(emb1, s1), numpy_tables(emb2, s2)
    assert list(t1) == list(t2)
    for name in t1:
        np.testing.assert_array_equal(t1[name], t2[name], err_msg=name)
    l1, l2 = emb1.logical_slots(s1), emb2.logical_slots(s2)
    assert list(l1) == list(l2)
    for name in l1:
        p1 = jax.tree_util.tree_leaves_with_path(l1[name])
        p2 = jax.tree_util.tree_leaves_with_path(l2[name])
        assert [p for p, _ in p1] == [p for p, _ in p2], name
        for (path, x), (_, y) in zip(p1, p2, strict=True):
            np.testing.assert_array_equal(
                np.asarray(x), np.asarray(y), err_msg=f"{name}{jax.tree_util.keystr(path)}"
            )
    assert int(s1.step) == int(s2.step)


def tf_values(tpu_emb: Any) -> dict[str, dict[str, np.ndarray]]:
    return {t: {k: v.numpy() for k, v in d.items()} for t, d in tpu_emb._variables.items()}


def assert_tf_holds_state(tpu_emb: Any, emb: je.Embedding, state: Any) -> None:
    """Every TF parameter and slot variable equals jaxembed's table or slot, exactly."""
    got, slots = tf_values(tpu_emb), numpy_slots(emb, state)
    for table, value in numpy_tables(emb, state).items():
        np.testing.assert_array_equal(got[table]["parameters"], value, err_msg=table)
        for slot, v in slots[table].items():
            np.testing.assert_array_equal(got[table][slot], v, err_msg=f"{table}/{slot}")


def fill_randomly(tpu_emb: Any, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Assigns seeded random values to every TF parameter and slot variable; returns them."""
    rng = np.random.default_rng(seed)
    values = {}
    for table, variables in tpu_emb._variables.items():
        values[table] = {}
        for key, variable in variables.items():
            shape = tuple(variable.shape)
            if key == "parameters":
                value = rng.normal(size=shape)
            else:  # slots: positive, as accumulators and velocities must be
                value = rng.uniform(0.1, 1.0, size=shape)
            values[table][key] = value.astype(np.float32)
            variable.assign(values[table][key])
    return values


# ---------------------------------------------------------------------------------------------
# JAX -> TF


@pytest.mark.parametrize("cls", TF_CLASSES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_jax_checkpoint_restores_into_tf(tmp_path, name, cls):
    emb, state = embedding(name), trained(name)
    _, twin, slot_names = OPTIMIZERS[name]
    path = export.save_tf_checkpoint(tmp_path / "ckpt", emb, state)
    assert path == str(tmp_path / "ckpt")
    keys = checkpoint_keys(path)
    assert set(keys) == expected_keys({t: slot_names for t in NAMES})
    for key, shape in keys.items():
        table = ITEMS if key.startswith("embedding/shop..items") else "table_1"
        assert tuple(shape) == SHAPES[table], key

    tpu_emb = tf_twin(twin(), TF_CLASSES[cls])
    # read() pairs with the write() the export uses (restore() would also want a save_counter);
    # restored before build, TF applies the values as it creates the variables.
    status = tf.train.Checkpoint(embedding=tpu_emb).read(path)
    tables = tpu_emb.embedding_tables
    status.assert_consumed()
    assert [c.name for c in tables] == list(NAMES)
    got = tf_values(tpu_emb)
    assert set(got) == set(NAMES)
    want_tables, want_slots = numpy_tables(emb, state), numpy_slots(emb, state)
    for table in NAMES:
        assert set(got[table]) == {"parameters", *slot_names}, table
        assert set(want_slots[table]) == set(slot_names), table
        np.testing.assert_array_equal(got[table]["parameters"], want_tables[table], err_msg=table)
        for slot in slot_names:
            np.testing.assert_array_equal(
                got[table][slot], want_slots[table][slot], err_msg=f"{table}/{slot}"
            )
    initial = numpy_tables(emb, emb.init(jax.random.key(11)))
    assert not np.array_equal(want_tables[ITEMS], initial[ITEMS])  # trained


def test_checkpoint_restore_as_the_docstring_shows(tmp_path):
    """``Checkpoint(embedding=...).restore(path)`` restores every value too. (The checkpoint is
    written with ``write()``, which stores no ``save_counter``; ``restore()`` creates one, so
    its ``assert_consumed`` would report that counter. The other tests use ``read()``.)"""
    emb, state = embedding("adam"), trained("adam")
    path = export.save_tf_checkpoint(tmp_path / "ckpt", emb, state)
    tpu_emb = tf_twin(TFE.Adam(0.05))
    tpu_emb.build()
    status = tf.train.Checkpoint(embedding=tpu_emb).restore(path)
    status.assert_nontrivial_match()
    assert_tf_holds_state(tpu_emb, emb, state)


def test_per_table_optimizers_restore_into_tf(tmp_path):
    """A table's own optimizer overrides the global one, in the checkpoint as in TF."""
    emb = je.Embedding(feature_config(items_optimizer=jeo.Adam(0.05)), jeo.FTRL(0.1))
    rng = np.random.default_rng(4)
    slot_names = {ITEMS: ("momenta", "velocities"), "table_1": ("accumulators", "linears")}
    state = emb.state_from_logical(
        {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()},
        {n: {k: rng.uniform(size=SHAPES[n]).astype(np.float32) for k in slot_names[n]}
         for n in NAMES},
    )  # fmt: skip
    path = export.save_tf_checkpoint(tmp_path / "ckpt", emb, state)
    assert set(checkpoint_keys(path)) == expected_keys(slot_names)
    tpu_emb = tf_twin(TFE.FTRL(0.1), items_optimizer=TFE.Adam(0.05))
    tpu_emb.build()
    tf.train.Checkpoint(embedding=tpu_emb).read(path).assert_consumed()
    assert_tf_holds_state(tpu_emb, emb, state)


def test_sharded_state_is_written_in_logical_row_order(tmp_path):
    emb = je.Embedding(
        feature_config(), OPTIMIZERS["adam"][0], mesh=_mesh(),
        sharding={ITEMS: "row", "table_1": "replicated"},
    )  # fmt: skip
    rng = np.random.default_rng(8)
    tables = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    slots = {
        n: {k: rng.uniform(size=s).astype(np.float32) for k in ("momenta", "velocities")}
        for n, s in SHAPES.items()
    }
    state = emb.state_from_logical(tables, slots, step=3)
    assert not np.array_equal(np.asarray(state.tables[ITEMS]), tables[ITEMS])  # permuted rows
    path = export.save_tf_checkpoint(tmp_path / "ckpt", emb, state)
    tpu_emb = tf_twin(TFE.Adam(0.05))
    tpu_emb.build()
    tf.train.Checkpoint(embedding=tpu_emb).read(path).assert_consumed()
    got = tf_values(tpu_emb)
    for table in NAMES:
        np.testing.assert_array_equal(got[table]["parameters"], tables[table], err_msg=table)
        for slot, value in slots[table].items():
            np.testing.assert_array_equal(got[table][slot], value, err_msg=f"{table}/{slot}")
    # And back onto one device.
    plain = embedding("adam")
    loaded = export.load_tf_checkpoint(path, plain, step=3)
    assert_states_equal(plain, loaded, emb, state)


# ---------------------------------------------------------------------------------------------
# TF -> JAX


@pytest.mark.parametrize("cls", TF_CLASSES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tf_checkpoint_loads_and_training_continues(tmp_path, name, cls):
    emb = embedding(name)
    _, twin, slot_names = OPTIMIZERS[name]
    tpu_emb = tf_twin(twin(), TF_CLASSES[cls])
    tpu_emb.build()
    values = fill_randomly(tpu_emb, seed=len(name))
    prefix = tf.train.Checkpoint(embedding=tpu_emb).write(str(tmp_path / "tf"))
    state = export.load_tf_checkpoint(prefix, emb, step=2)
    assert int(state.step) == 2
    tables, slots = numpy_tables(emb, state), numpy_slots(emb, state)
    assert list(tables) == list(NAMES)
    for table in NAMES:
        np.testing.assert_array_equal(tables[table], values[table]["parameters"], err_msg=table)
        assert set(slots[table]) == set(slot_names), table
        for slot in slot_names:
            np.testing.assert_array_equal(
                slots[table][slot], values[table][slot], err_msg=f"{table}/{slot}"
            )
    # Migration: training goes on exactly as from a state built from the same numpy values.
    direct = emb.state_from_logical(
        {t: values[t]["parameters"] for t in NAMES},
        {t: {s: values[t][s] for s in slot_names} for t in NAMES},
        step=2,
    )
    inputs, grads = make_batch(7)
    batch = emb.preprocess(inputs)
    after_loaded = jitted_apply(emb)(state, batch, grads)
    after_direct = jitted_apply(emb)(direct, batch, grads)
    assert_states_equal(emb, after_loaded, emb, after_direct)
    assert not np.array_equal(numpy_tables(emb, after_loaded)[ITEMS], tables[ITEMS])


def _write_variant(how: str, tpu_emb: Any, tmp_path) -> tuple[str, str]:
    """Writes ``tpu_emb`` one way; returns (the path to load from, the key root)."""
    if how == "model_root":
        return tf.train.Checkpoint(model=tpu_emb).write(str(tmp_path / "ck")), "model/"
    if how == "nested":
        module = tf.Module()
        module.embedding_api = tpu_emb
        return tf.train.Checkpoint(model=module).write(str(tmp_path / "ck")), "model/embedding_api/"
    assert how == "save_dir"
    manager_dir = tmp_path / "dir"
    ckpt = tf.train.Checkpoint(embedding=tpu_emb)
    ckpt.save(str(manager_dir / "ckpt"))
    last = ckpt.save(str(manager_dir / "ckpt"))  # the directory resolves to the latest save
    assert last.endswith("ckpt-2")
    return str(manager_dir), "embedding/"


@pytest.mark.parametrize("how", ["model_root", "nested", "save_dir"])
def test_tf_checkpoint_root_names_and_directories(tmp_path, how):
    emb = embedding("adam")
    tpu_emb = tf_twin(TFE.Adam(0.05))
    tpu_emb.build()
    fill_randomly(tpu_emb, seed=1)  # overwritten below when saving twice
    values = fill_randomly(tpu_emb, seed=2)
    path, root = _write_variant(how, tpu_emb, tmp_path)
    checkpoint = tf.train.latest_checkpoint(path) if how == "save_dir" else path
    assert set(checkpoint_keys(checkpoint)) - {"save_counter" + SUFFIX} == expected_keys(
        {t: ("momenta", "velocities") for t in NAMES}, root
    )
    for source in {path, checkpoint}:  # for save_dir: the directory, and the prefix
        state = export.load_tf_checkpoint(source, emb)
        tables, slots = numpy_tables(emb, state), numpy_slots(emb, state)
        for table in NAMES:
            np.testing.assert_array_equal(tables[table], values[table]["parameters"], err_msg=table)
            for slot in ("momenta", "velocities"):
                np.testing.assert_array_equal(slots[table][slot], values[table][slot], err_msg=slot)


MESH_CASES = {
    "adagrad-row": ("adagrad", {ITEMS: "row", "table_1": "replicated"}),
    "ftrl-tablewise": ("ftrl", {ITEMS: "table", "table_1": "row"}),
    "optax-row": ("optax", {ITEMS: "row", "table_1": "table"}),
}


@pytest.mark.parametrize("case", MESH_CASES)
def test_tf_checkpoint_loads_onto_a_mesh(tmp_path, case):
    name, sharding = MESH_CASES[case]
    tx = optax.adam(0.01)
    optimizer = jeo.from_optax(tx) if name == "optax" else OPTIMIZERS[name][0]
    emb = je.Embedding(feature_config(), optimizer, mesh=_mesh(), sharding=sharding)
    tpu_emb = tf_twin(None if name == "optax" else OPTIMIZERS[name][1]())
    tpu_emb.build()
    values = fill_randomly(tpu_emb, seed=3)
    prefix = tf.train.Checkpoint(embedding=tpu_emb).write(str(tmp_path / "tf"))
    state = export.load_tf_checkpoint(prefix, emb)
    row = next(t for t in NAMES if sharding[t] == "row")
    assert state.tables[row].sharding.mesh.shape == {"x": 8}
    assert not np.array_equal(np.asarray(state.tables[row]), values[row]["parameters"])
    tables, slots = numpy_tables(emb, state), emb.logical_slots(state)
    for table in NAMES:
        np.testing.assert_array_equal(tables[table], values[table]["parameters"], err_msg=table)
        if name == "optax":  # fresh Optax state
            fresh = tx.init(jax.numpy.asarray(values[table]["parameters"]))
            want = [np.asarray(x) for x in jax.tree.leaves(fresh)]
            got = [np.asarray(x) for x in jax.tree.leaves(slots[table])]
        else:
            want = [values[table][slot] for slot in OPTIMIZERS[name][2]]
            got = [np.asarray(slots[table][slot]) for slot in OPTIMIZERS[name][2]]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=table)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_round_trip_is_exact_and_tables_only_gives_fresh_slots(tmp_path, name):
    emb, state = embedding(name), trained(name)
    path = export.save_tf_checkpoint(tmp_path / "ckpt", emb, state)
    loaded = export.load_tf_checkpoint(path, emb, step=int(state.step))
    assert_states_equal(emb, loaded, emb, state)

    fresh = export.load_tf_checkpoint(path, emb, tables_only=True)
    want = emb.state_from_logical(numpy_tables(emb, state))  # slots at their initial values
    assert_states_equal(emb, fresh, emb, want)
    if OPTIMIZERS[name][2]:
        assert any(
            not np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(
                jax.tree.leaves(emb.logical_slots(fresh)),
                jax.tree.leaves(emb.logical_slots(state)),
                strict=True,
            )
        )


def test_optax_tables_are_written_without_slots_and_load_with_fresh_state(tmp_path):
    tx = optax.adam(0.01)
    emb = je.Embedding(feature_config(), jeo.from_optax(tx))
    state = emb.init(jax.random.key(5))
    for seed in TRAIN_SEEDS[:2]:
        inputs, grads = make_batch(seed)
        state = jitted_apply(emb)(state, emb.preprocess(inputs), grads)
    path = export.save_tf_checkpoint(tmp_path / "ckpt", emb, state)
    assert set(checkpoint_keys(path)) == expected_keys({t: () for t in NAMES})
    tpu_emb = tf_twin(None)
    tpu_emb.build()
    tf.train.Checkpoint(embedding=tpu_emb).read(path).assert_consumed()

    loaded = export.load_tf_checkpoint(path, emb)
    tables = numpy_tables(emb, state)
    want = emb.state_from_logical(tables)  # fresh Optax state
    assert_states_equal(emb, loaded, emb, want)
    for name, slots in emb.logical_slots(loaded).items():
        fresh = tx.init(jax.numpy.asarray(tables[name]))
        for got, expected in zip(jax.tree.leaves(slots), jax.tree.leaves(fresh), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=name)
    # The trained Optax state was not all zeros, so "fresh" really differs.
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(emb.logical_slots(state)[ITEMS]))


def test_mixed_optax_and_tf_optimizers(tmp_path):
    """An Optax table beside an Adagrad table: Adagrad slots round-trip, Optax starts fresh."""
    tx = optax.sgd(0.1, momentum=0.9)
    emb = je.Embedding(feature_config(items_optimizer=jeo.from_optax(tx)), jeo.Adagrad(0.1))
    state = emb.init(jax.random.key(6))
    for seed in TRAIN_SEEDS[:2]:
        inputs, grads = make_batch(seed)
        state = jitted_apply(emb)(state, emb.preprocess(inputs), grads)
    path = export.save_tf_checkpoint(tmp_path / "ckpt", emb, state)
    assert set(checkpoint_keys(path)) == expected_keys({ITEMS: (), "table_1": ("accumulators",)})
    # TF: the Optax table has no optimizer, the other one its own Adagrad.
    items = TFE.TableConfig(40, 4, combiner="mean", name=ITEMS)
    other = TFE.TableConfig(24, 2, combiner="sum", optimizer=TFE.Adagrad(0.1))
    F = TFE.FeatureConfig
    tpu_emb = TFE.TPUEmbeddingForServing(
        {"a": F(items), "b": [F(other), F(items, max_sequence_length=2)]}, None
    )
    tpu_emb.build()
    tf.train.Checkpoint(embedding=tpu_emb).read(path).assert_consumed()
    assert set(tpu_emb._variables[ITEMS]) == {"parameters"}

    loaded = export.load_tf_checkpoint(path, emb, step=2)
    tables = numpy_tables(emb, state)
    for table in NAMES:
        np.testing.assert_array_equal(numpy_tables(emb, loaded)[table], tables[table])
    np.testing.assert_array_equal(
        numpy_slots(emb, loaded)["table_1"]["accumulators"],
        numpy_slots(emb, state)["table_1"]["accumulators"],
    )
    got_items = emb.logical_slots(loaded)[ITEMS]
    fresh = tx.init(jax.numpy.asarray(tables[ITEMS]))
    for got, expected in zip(jax.tree.leaves(got_items), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_lookup_only_embedding_loads_the_tables(tmp_path):
    """An ``Embedding`` without optimizer reads the tables and ignores the stored slots."""
    path = export.save_tf_checkpoint(tmp_path / "ckpt", embedding("adam"), trained("adam"))
    emb = je.Embedding(feature_config())
    state = export.load_tf_checkpoint(path, emb)
    assert_states_equal(emb, state, emb, emb.state_from_logical(
        numpy_tables(embedding("adam"), trained("adam"))))  # fmt: skip
    assert all(slots == {} for slots in state.slots.values())
    # And writes them back as a slot-less checkpoint that TF reads with optimizer=None.
    again = export.save_tf_checkpoint(tmp_path / "again", emb, state)
    assert set(checkpoint_keys(again)) == expected_keys({t: () for t in NAMES})
    tpu_emb = tf_twin(None)
    tpu_emb.build()
    tf.train.Checkpoint(embedding=tpu_emb).read(again).assert_consumed()


# ---------------------------------------------------------------------------------------------
# Errors


def _adagrad_checkpoint(directory) -> str:
    return export.save_tf_checkpoint(directory / "ckpt", embedding("adagrad"), trained("adagrad"))


def test_missing_table_names_the_table(tmp_path):
    path = _adagrad_checkpoint(tmp_path)
    emb = je.Embedding(feature_config(name="clicks"), OPTIMIZERS["adagrad"][0])
    with pytest.raises(ValueError, match=r"'clicks'") as info:
        export.load_tf_checkpoint(path, emb)
    assert "table_1" in str(info.value)  # the stored variables are listed too


def test_wrong_shape_names_the_variable_and_both_shapes(tmp_path):
    path = _adagrad_checkpoint(tmp_path)
    emb = je.Embedding(feature_config(vocab=41), OPTIMIZERS["adagrad"][0])
    with pytest.raises(ValueError, match=r"'shop\.items'.*\[40, 4\].*\[41, 4\]"):
        export.load_tf_checkpoint(path, emb)
    with pytest.raises(ValueError, match=r"\[40, 4\].*\[41, 4\]"):
        export.load_tf_checkpoint(path, emb, tables_only=True)


def test_missing_slots_suggest_tables_only(tmp_path):
    emb_sgd = embedding("sgd")
    path = export.save_tf_checkpoint(tmp_path / "ckpt", emb_sgd, trained("sgd"))
    emb = embedding("adagrad")
    with pytest.raises(ValueError, match=r"accumulators.*tables_only=True"):
        export.load_tf_checkpoint(path, emb)
    state = export.load_tf_checkpoint(path, emb, tables_only=True)
    want = emb.state_from_logical(numpy_tables(emb_sgd, trained("sgd")))
    assert_states_equal(emb, state, emb, want)


def test_missing_path_is_file_not_found(tmp_path):
    emb = embedding("adagrad")
    with pytest.raises(FileNotFoundError):
        export.load_tf_checkpoint(tmp_path / "nothing" / "ckpt", emb)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        export.load_tf_checkpoint(tmp_path / "empty", emb)
