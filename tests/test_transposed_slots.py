"""The slots grouped by the row they hold (``lookup.transpose_slots``, ``_kernels.use_sums``):
how the pure-JAX step (what TPUs and GPUs run) sums its gradient rows.

* ``transpose_slots`` gives every row its uses in slot order, first then blocks of 8, against a
  plain Python grouping; the C++ helper and the numpy code give the same arrays; too few
  blocks are refused.
* ``use_sums`` is the transpose of the lookup's slot sums (bit for bit on integers).
* ``preprocess`` transposes the plans exactly when the step will sum gradients in pure JAX, and
  a step from those plans equals the step from plain plans (to float32 rounding) and the CPU
  kernels' step, on 1 and 8 devices, with shared tables, weights, sequences, dense ids and rows
  long enough to overflow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed as je
from jaxembed import _distinct, _kernels, lookup


@pytest.fixture(params=["native", "numpy"])
def transpose(request, monkeypatch):
    """``lookup.transpose_slots`` through the C++ helper, or through its numpy code."""
    if request.param == "native":
        assert _distinct.library() is not None, "csrc/distinct.cc not built"
    else:
        monkeypatch.setattr(_distinct, "transpose", lambda *args: None)
    return lookup.transpose_slots


def _random_slots(rng, rows: int, width: int, num_rows: int, weighted: bool):
    # Many uses of a few rows (as Zipf ids give), some slots empty (-1, num_rows, beyond).
    slots = rng.integers(-1, num_rows + 2, size=(rows, width)).astype(np.int32)
    hot = rng.random(slots.shape) < 0.3
    slots[hot] = rng.integers(0, 3, size=int(hot.sum()))
    weights = rng.normal(size=slots.shape).astype(np.float32) if weighted else None
    return slots, weights


def _grouped(slots, weights, num_rows):
    """Each row's uses ``(slot row, weight)`` in slot order, by plain Python."""
    uses: dict[int, list] = {p: [] for p in range(num_rows)}
    flat_w = None if weights is None else weights.reshape(len(slots), -1)
    for r, row in enumerate(slots.reshape(len(slots), -1)):
        for s, p in enumerate(row):
            if 0 <= p < num_rows:
                uses[int(p)].append((r, 1.0 if flat_w is None else float(flat_w[r, s])))
    return uses


@pytest.mark.parametrize("weighted", [False, True])
def test_each_row_gets_its_uses_in_slot_order(transpose, weighted):
    rng = np.random.default_rng(3)
    rows, width, num_rows = 40, 6, 25
    slots, weights = _random_slots(rng, rows, width, num_rows, weighted)
    want = _grouped(slots, weights, num_rows)
    needed = lookup.rest_blocks(np.array([len(u) for u in want.values()]))
    assert needed > 1  # some rows have more than 9 uses
    uses = transpose(slots, weights, num_rows, needed + 3)  # 3 blocks of padding
    first, rest = np.asarray(uses.first), np.asarray(uses.rest)
    rest_rows = np.asarray(uses.rest_rows)
    assert np.all(np.diff(rest_rows) >= 0) and np.all(rest_rows[needed:] == num_rows)
    assert np.all(rest[needed:] == rows)
    for p, expected in want.items():
        got = [(int(first[p]), None if weights is None else float(uses.first_weights[p]))]
        for b in np.flatnonzero(rest_rows == p):
            for j in range(8):
                if rest[b, j] != rows:
                    w = None if weights is None else float(uses.rest_weights[b, j])
                    got.append((int(rest[b, j]), w))
        if not expected:
            assert first[p] == rows and len(got) == 1
            continue
        assert [r for r, _ in got] == [r for r, _ in expected], p
        if weights is not None:
            assert [w for _, w in got] == [w for _, w in expected], p


def test_the_compiled_helper_gives_the_numpy_arrays(monkeypatch):
    assert _distinct.library() is not None, "csrc/distinct.cc not built"
    rng = np.random.default_rng(4)
    slots, weights = _random_slots(rng, 300, 17, 200, weighted=True)
    blocks = lookup.rest_blocks(np.bincount(slots[(slots >= 0) & (slots < 200)])) + 5
    native = lookup.transpose_slots(slots, weights, 200, blocks)
    monkeypatch.setattr(_distinct, "transpose", lambda *args: None)
    plain = lookup.transpose_slots(slots, weights, 200, blocks)
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)


def test_too_few_blocks_are_refused(transpose):
    slots = np.zeros((20, 1), np.int32)  # row 0 used 20 times: 19 further uses, 3 blocks
    assert lookup.rest_blocks(np.array([20])) == 3
    with pytest.raises(ValueError, match="need 3 blocks, more than the 2 planned"):
        transpose(slots, None, 4, 2)


@pytest.mark.parametrize("weighted", [False, True])
def test_use_sums_are_the_transpose_of_slot_sums(transpose, weighted):
    rng = np.random.default_rng(5)
    num_rows, out, dim = 30, 25, 6
    head = rng.integers(-1, num_rows + 2, size=(out, 9)).astype(np.int32)
    head[:, :3] = rng.integers(0, 3, size=(out, 3))  # rows 0-2 used many times
    blocks = rng.integers(-1, num_rows + 2, size=(out, 2, 8)).astype(np.int32)
    hw = bw = None
    if weighted:  # halves: every order of the additions gives the same bits
        hw = rng.integers(-4, 5, size=head.shape).astype(np.float32) / 2
        bw = rng.integers(-4, 5, size=blocks.shape).astype(np.float32) / 2
    slots = np.concatenate([head, blocks.reshape(out, -1)], axis=1)
    weights = None if not weighted else np.concatenate([hw, bw.reshape(out, -1)], axis=1)
    needed = lookup.rest_blocks(np.bincount(slots[(slots >= 0) & (slots < num_rows)]))
    uses = transpose(slots, weights, num_rows, needed)

    def sums(rows):
        return _kernels._slot_sums_jax(rows, head, hw, blocks, bw)

    cot = jnp.asarray(rng.integers(-4, 5, size=(out, dim)), jnp.float32)
    want = jax.vjp(sums, jnp.zeros((num_rows, dim)))[1](cot)[0]
    got = jax.jit(_kernels.use_sums)(cot, uses)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.abs(np.asarray(got)[:3]).sum() > 0


def _features():
    table = je.TableConfig(300, 4, combiner="mean", name="t")
    other = je.TableConfig(40, 4, combiner="sqrtn", name="u")
    return {
        "ragged": je.FeatureConfig(table),
        "weighted": je.FeatureConfig(other),
        "dense": je.FeatureConfig(other),
        "sparse": je.FeatureConfig(table),
        "seq": je.FeatureConfig(other, max_sequence_length=3),
    }


def _inputs(rng, batch: int) -> dict:
    lengths = rng.integers(0, 5, batch)
    lengths[3] = 400  # one row far past the others: overflow blocks
    ids = np.where(rng.random(int(lengths.sum())) < 0.5, rng.integers(0, 3, int(lengths.sum())),
                   rng.integers(0, 40, int(lengths.sum())))  # fmt: skip
    rows = np.repeat(np.arange(batch), lengths)
    cols = np.concatenate([np.arange(n) for n in lengths])
    weights = rng.uniform(0.5, 2.0, ids.shape[0]).astype(np.float32)
    return {
        "ragged": je.Ragged.from_row_lengths(ids, lengths),
        "weighted": je.Ragged.from_row_lengths(ids, lengths),
        "dense": rng.integers(0, 40, (batch, 2)),
        "sparse": je.Sparse(np.stack([rows, cols], 1), ids, (batch, 400)),
        "seq": je.Ragged.from_row_lengths(ids, lengths),
    }, weights


def _preprocess(emb, inputs, weights, kernels: bool):
    w = {k: None for k in inputs}
    w["weighted"] = je.Ragged(weights, inputs["weighted"].row_splits)
    with _kernels.use_kernels(kernels):
        return emb.preprocess(inputs, w)


@pytest.mark.parametrize("devices", [1, 8])
def test_a_step_from_transposed_plans_equals_the_other_paths(devices):
    mesh = None if devices == 1 else jax.make_mesh((devices,), ("d",))
    emb = je.Embedding(_features(), je.optimizers.Adagrad(0.5), mesh=mesh)
    rng = np.random.default_rng(6)
    inputs, weights = _inputs(rng, 64)  # 8 examples a device on 8
    transposed = _preprocess(emb, inputs, weights, kernels=False)
    plain = _preprocess(emb, inputs, weights, kernels=True)
    for t, p in zip(transposed.plans, plain.plans, strict=True):
        assert t.uses is not None and p.uses is None
    ragged = transposed.plans[transposed.paths.index("ragged")]
    assert ragged.overflow_uses is not None  # the long row overflowed

    def step(state, batch):
        acts = emb.lookup(state, batch)
        grads = jax.grad(lambda a: sum(jnp.sum(jnp.sin(3 * x)) for x in jax.tree.leaves(a)))(acts)
        return emb.apply_gradients(state, batch, grads)

    state = emb.init(jax.random.key(0))
    with _kernels.use_kernels(False):
        got = jax.jit(step)(state, transposed)
        column_loop = jax.jit(step)(state, plain)
    fused = jax.jit(step)(state, plain)
    before = jax.tree.leaves(state.tables)
    after = jax.tree.leaves(got.tables)
    assert all(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(after, before, strict=True))
    for other in (column_loop, fused):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(other), strict=True):
            # (hot rows sum hundreds of gradient rows, in another order)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
