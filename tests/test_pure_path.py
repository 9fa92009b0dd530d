"""The pure-JAX backward pass and update (what TPUs and GPUs run) against their definitions.

``_slot_grads_jax`` (one scatter-add of the cotangent per slot column) is the transpose of
``_slot_sums_jax``; ``_apply_generic`` (the update in chunks of ``_CHUNK`` rows) gives every row
the update of one pass over all rows, to float32 rounding (XLA may contract a product and a sum
into one FMA in one and not the other). These need no CPU kernel: they run in both CI passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxembed import _kernels as k
from jaxembed import optimizers as jeo


def _slots(rng, num_rows: int, out: int, head: int, tail: int, weighted: bool):
    """Slots into ``num_rows`` rows, some empty (-1 or past the end), many shared."""
    head_ids = rng.integers(-1, num_rows + 2, size=(out, head)).astype(np.int32)
    blocks = rng.integers(-1, num_rows + 2, size=(out, tail, 8)).astype(np.int32)
    if not weighted:
        return head_ids, None, blocks, None
    # Halves: products and sums of small integers are exact in any order.
    hw = rng.integers(-4, 5, size=(out, head)).astype(np.float32) / 2
    bw = rng.integers(-4, 5, size=(out, tail, 8)).astype(np.float32) / 2
    return head_ids, hw, blocks, bw


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("head,tail", [(1, 0), (9, 0), (40, 0), (9, 3), (0, 2)])
def test_slot_grads_are_the_transpose_of_slot_sums(weighted, head, tail):
    rng = np.random.default_rng(head * 10 + tail)
    num_rows, out, dim = 30, 25, 6
    head_ids, hw, blocks, bw = _slots(rng, num_rows, out, head, tail, weighted)

    def sums(rows):
        return k._slot_sums_jax(rows, head_ids, hw, blocks, bw)

    zeros = jnp.zeros((num_rows, dim), jnp.float32)
    grads = jax.jit(k._slot_grads_jax, static_argnums=5)
    # Integers: every order of the additions gives the same bits.
    exact = jnp.asarray(rng.integers(-4, 5, size=(out, dim)), jnp.float32)
    want = jax.vjp(sums, zeros)[1](exact)[0]
    got = grads(exact, head_ids, hw, blocks, bw, num_rows)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.any(np.asarray(got) != 0)
    # Random values: equal up to the order of a row's additions.
    cot = jnp.asarray(rng.normal(size=(out, dim)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(grads(cot, head_ids, hw, blocks, bw, num_rows)),
        np.asarray(jax.vjp(sums, zeros)[1](cot)[0]),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("head,tail", [(9, 0), (40, 0), (9, 3), (0, 2)])
def test_slot_grads_add_column_by_column(weighted, head, tail):
    """Random values, bit for bit against float32 numpy adding in the documented order: slot
    column by column (head, then blocks in order), rows in order within a column, each product
    ``w * cot`` rounded before its add. The loop reads each column where it lies in ``head`` or
    ``blocks``."""
    rng = np.random.default_rng(head * 10 + tail + 7)
    num_rows, out, dim = 30, 25, 6
    head_ids, hw, blocks, bw = _slots(rng, num_rows, out, head, tail, weighted)
    if weighted:
        hw = rng.normal(size=hw.shape).astype(np.float32)
        bw = rng.normal(size=bw.shape).astype(np.float32)
    cot = rng.normal(size=(out, dim)).astype(np.float32)
    slots = np.concatenate([head_ids, blocks.reshape(out, -1)], axis=1)
    weights = None if not weighted else np.concatenate([hw, bw.reshape(out, -1)], axis=1)
    want = np.zeros((num_rows, dim), np.float32)
    for s in range(slots.shape[1]):
        for r in range(out):
            if 0 <= slots[r, s] < num_rows:
                update = cot[r] if weights is None else np.float32(weights[r, s]) * cot[r]
                want[slots[r, s]] += update
    got = jax.jit(k._slot_grads_jax, static_argnums=5)(cot, head_ids, hw, blocks, bw, num_rows)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.any(want != 0)


def test_slot_grads_of_no_slots_are_zero():
    cot = jnp.ones((4, 3), jnp.float32)
    head, blocks = np.zeros((4, 0), np.int32), np.zeros((4, 0, 8), np.int32)
    got = k._slot_grads_jax(cot, head, None, blocks, None, 5)
    np.testing.assert_array_equal(np.asarray(got), np.zeros((5, 3), np.float32))


UPDATES = {
    "sgd": jeo.SGD(0.1),
    "adagrad": jeo.Adagrad(0.1, initial_accumulator_value=0.2, clipvalue=0.5),
    "adam": jeo.Adam(0.05),
    "ftrl": jeo.FTRL(0.1, l1_regularization_strength=0.01),
    "rowwise_adagrad": jeo.RowWiseAdagrad(0.1),
    "partial_rowwise_adam": jeo.PartialRowWiseAdam(0.05, weight_decay=0.1),
}


def _update_case(opt, n: int, vocab: int = 3000, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
    slots = jax.tree.map(lambda x: x + 0.25, opt.init_slots(table))
    ids = rng.choice(vocab, n, replace=False).astype(np.int32)
    ids[5::97] = vocab  # padding inside, and a negative id
    ids[3] = -1
    grads = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
    return table, slots, jnp.asarray(ids), grads


@pytest.mark.parametrize("name", list(UPDATES))
def test_chunked_update_gives_every_row_the_update_of_one_pass(name):
    opt = UPDATES[name]
    n = 3 * k._CHUNK + 17  # three whole chunks and a padded one
    table, slots, ids, grads = _update_case(opt, n)
    state = (table, slots)

    def chunked(state):
        return k._apply_generic(opt, *state, ids, grads, jnp.int32(2))

    def one_pass(state):
        return k._apply_once(opt, *state, ids, grads, jnp.int32(2))

    got = jax.tree.map(np.asarray, jax.jit(chunked)(state))
    want = jax.tree.map(np.asarray, jax.jit(one_pass)(state))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # TF's TPU tolerances
    real = np.asarray(ids)[(np.asarray(ids) >= 0) & (np.asarray(ids) < table.shape[0])]
    assert not np.array_equal(got[0][real], np.asarray(table)[real])
    untouched = np.setdiff1d(np.arange(table.shape[0]), real)
    np.testing.assert_array_equal(got[0][untouched], np.asarray(table)[untouched])


@pytest.mark.parametrize("name", [n for n in UPDATES if n != "sgd"])
def test_update_writes_the_new_slots_then_reads_them_back(name):
    """``_apply_once`` writes the new slot rows, then computes the new rows from the slots read
    back (``new_slots``, then ``new_rows``): the update of ``apply`` on the gathered rows."""
    opt = UPDATES[name]
    table, slots, ids, grads = _update_case(opt, 300, seed=1)
    got = jax.jit(lambda t, s: k._apply_once(opt, t, s, ids, grads, jnp.int32(3)))(table, slots)
    real = np.isin(np.asarray(ids), np.arange(table.shape[0]))
    at = np.asarray(ids)[real]
    want = jax.jit(opt.apply)(table[at], {n: v[at] for n, v in slots.items()}, grads[real], 3)
    assert set(got[1]) == set(want[1])
    for name_ in want[1]:
        np.testing.assert_allclose(got[1][name_][at], want[1][name_], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0][at], want[0], rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(table.shape[0]), at)
    np.testing.assert_array_equal(np.asarray(got[0])[untouched], np.asarray(table)[untouched])


@pytest.mark.parametrize("name", [n for n in UPDATES if UPDATES[n].splits_update])
def test_new_slot_rows_kept_as_computed_update_as_read_back(monkeypatch, name):
    """On CPU the new rows read the new slot rows back from the slot arrays; on TPUs and GPUs
    (``_kernels._kept``) they read them as computed, behind an optimization barrier, with no
    second read from device memory. Forced here on CPU: every row and slot keeps its bits."""
    opt = UPDATES[name]
    table, slots, ids, grads = _update_case(opt, 3 * k._CHUNK + 17, seed=2)

    def update():  # traced anew each call
        return jax.jit(lambda s: k._apply_generic(opt, *s, ids, grads, jnp.int32(3)))(
            (table, slots)
        )

    want = jax.tree.map(np.asarray, update())
    kept = []

    def as_kept(rows, written, rows_of):
        kept.append(rows)
        return k._kept(rows)

    monkeypatch.setattr(k, "_as_written", as_kept)
    got = jax.tree.map(np.asarray, update())
    assert kept  # the update took the kept rows
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_zero_argument_learning_rate_is_called_once_per_update():
    """The learning rate is computed once per update, outside the loop over chunks of rows: a
    zero-argument callable (a host callback) is not called once per chunk."""
    calls = []

    def lr():
        calls.append(1)
        return 0.1

    opt = jeo.Adagrad(lr)
    table, slots, ids, grads = _update_case(opt, 3 * k._CHUNK + 17)
    update = jax.jit(lambda s: k._apply_generic(opt, *s, ids, grads, jnp.int32(0)))
    new_table, _ = jax.block_until_ready(update((table, slots)))
    assert len(calls) == 1
    assert not np.array_equal(np.asarray(new_table), np.asarray(table))


def test_chunked_update_is_in_place():
    """Donated, the loop updates the table and its slots in place: no copy of either."""
    opt = UPDATES["adagrad"]
    table, slots, ids, grads = _update_case(opt, 2 * k._CHUNK + 1, vocab=4999)
    step = jax.jit(lambda s: k._apply_generic(opt, *s, ids, grads, jnp.int32(0)), donate_argnums=0)
    hlo = step.lower((table, slots)).compile().as_text()
    assert " while(" in hlo
    assert "f32[4999,8]{1,0} copy(" not in hlo


def test_optax_updates_take_one_pass():
    """A ``from_optax`` update is not cut into chunks: its count advances once per step."""
    sched = optax.linear_schedule(0.5, 0.1, 4)
    opt = jeo.from_optax(optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(sched)))
    table, slots, ids, grads = _update_case(opt, 2 * k._CHUNK + 5)

    def update(fn):
        return jax.jit(lambda t, s: fn(opt, t, s, ids, grads, jnp.int32(0)))(table, slots)

    got, want = update(k._apply_generic), update(k._apply_once)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    counts = [np.asarray(x) for x in jax.tree.leaves(got[1]) if np.ndim(x) == 0]
    assert counts and all(int(c) == 1 for c in counts)


@pytest.mark.parametrize(
    "chunks,extra,padding,trips",  # real ids: chunks x _CHUNK + extra; padding in chunks
    [(0, 0, 0.5, 0), (0, 1, 0, 1), (1, 0, 1.5, 1), (1, 1, 2, 2), (2.25, 0, 0.75, 3)],
)
def test_update_loop_stops_after_the_last_chunk_with_a_real_id(chunks, extra, padding, trips):
    """Trailing padding (ids equal to the row count) costs no trips; padding before a real id
    does not shorten the loop."""
    vocab, padding = 5000, round(padding * k._CHUNK)
    real = round(chunks * k._CHUNK) + extra
    ids = np.concatenate([np.arange(real), np.full(padding, vocab)]).astype(np.int32)
    assert int(k._live_chunks(jnp.asarray(ids), vocab)) == trips
    if real:
        ids[: real - 1] = -1  # only the last real id is left: the same trips
        assert int(k._live_chunks(jnp.asarray(ids), vocab)) == trips


def test_vmapped_update_loops_to_the_busiest_member_without_selecting_tables():
    """Under ``vmap`` with a batch of ids, each member gets its own update, and the loop runs
    the most trips any member needs: a bound per member would make XLA select every carried
    table on every trip."""
    opt = UPDATES["adagrad"]
    vocab, dim = 5000, 8
    members = [_update_case(opt, n, vocab, dim, seed) for seed, n in enumerate((1100, 300))]
    n = 3 * k._CHUNK
    ids = np.full((2, n), vocab, np.int32)  # the second member has one live chunk, the first 3
    grads = np.zeros((2, n, dim), np.float32)
    for b, (_, _, i, g) in enumerate(members):
        ids[b, : i.shape[0]], grads[b, : i.shape[0]] = i, g
    tables = jnp.stack([m[0] for m in members])
    slots = jax.tree.map(lambda *x: jnp.stack(x), *[m[1] for m in members])

    def update(t, s, i, g):
        return k._apply_generic(opt, t, s, i, g, jnp.int32(1))

    batched = jax.jit(jax.vmap(update))
    got = jax.tree.map(np.asarray, batched(tables, slots, jnp.asarray(ids), jnp.asarray(grads)))
    for b, (table, slot, i, g) in enumerate(members):
        want = jax.jit(k._apply_once, static_argnums=0)(opt, table, slot, i, g, jnp.int32(1))
        for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a[b], np.asarray(w), rtol=1e-5, atol=1e-6)
    hlo = batched.lower(tables, slots, jnp.asarray(ids), jnp.asarray(grads)).compile().as_text()
    assert f"f32[2,{vocab},{dim}]{{2,1,0}} select(" not in hlo


def test_nested_vmaps_leave_the_update_loop_bound_unbatched():
    """Two levels of ``vmap`` over ids: the loop still runs to the busiest member's last chunk
    (only one member has ids in its third chunk), and no carried table is selected."""
    opt, vocab, dim, c = UPDATES["adagrad"], 300, 4, k._CHUNK
    ids = np.full((2, 2, 3 * c), vocab, np.int32)
    ids[:, :, :3] = [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
    ids[1, 0, 2 * c + 1] = 299
    grads = np.ones((2, 2, 3 * c, dim), np.float32)
    tables = jnp.zeros((2, 2, vocab, dim), jnp.float32)
    slots = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (2, 2, *x.shape)), opt.init_slots(tables[0, 0])
    )

    def update(t, s, i, g):
        return k._apply_generic(opt, t, s, i, g, jnp.int32(0))

    nested = jax.jit(jax.vmap(jax.vmap(update)))
    new_tables, _ = nested(tables, slots, jnp.asarray(ids), jnp.asarray(grads))
    touched = np.asarray(new_tables)[..., 0] != 0
    want = np.zeros((2, 2, vocab), bool)
    for b in np.ndindex(2, 2):
        want[b][ids[b][ids[b] < vocab]] = True
    np.testing.assert_array_equal(touched, want)  # the last chunk's id 299 was updated
    hlo = nested.lower(tables, slots, jnp.asarray(ids), jnp.asarray(grads)).compile().as_text()
    assert f"f32[2,2,{vocab},{dim}]" in hlo
    assert f"f32[2,2,{vocab},{dim}]{{3,2,1,0}} select(" not in hlo
