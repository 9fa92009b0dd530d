"""benchmarks/hlo_bytes.py: the row-aware byte count of compiled HLO (bench_accelerator.py).

XLA's cost analysis charges a gather or scatter with its whole table; the row-aware count must
charge the rows it touches (and the indices), and still charge a copy of a whole table in full.
Every expectation follows from the shapes: ``K`` rows of ``D`` float32 out of ``V``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hlo_bytes  # noqa: E402

V, D, K = 20_000, 16, 300
ROWS = K * D * 4  # bytes of the K rows
IDS = K * 4  # int32 indices
TABLE = V * D * 4


def compiled(fn, *args, donate=()):
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile()


def operands():
    table = jnp.zeros((V, D), jnp.float32)
    ids = (jnp.arange(K, dtype=jnp.int32) * 37) % V  # distinct
    updates = jnp.ones((K, D), jnp.float32)
    return table, ids, updates


def counted(c) -> dict:
    return hlo_bytes.row_aware_bytes(c.as_text())


def xla_bytes(c) -> float:
    cost = c.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"])


@pytest.mark.parametrize("how", ["take", "getitem"])
def test_gather_is_charged_the_rows_it_reads_not_the_table(how):
    table, ids, _ = operands()
    fn = {"take": lambda t, i: jnp.take(t, i, axis=0), "getitem": lambda t, i: t[i]}[how]
    c = compiled(fn, table, ids)
    got = counted(c)
    # rows read + rows written + the indices (read, maybe once more by an index fusion)
    assert 2 * ROWS + IDS <= got["bytes"] <= 2 * ROWS + 4 * IDS
    assert xla_bytes(c) >= TABLE  # XLA's own figure charges the whole table
    assert got["naive_bytes"] == pytest.approx(xla_bytes(c), rel=0.01)


def test_in_place_scatter_is_charged_the_rows_it_writes():
    table, ids, updates = operands()
    c = compiled(lambda t, i, u: t.at[i].set(u), table, ids, updates, donate=(0,))
    got = counted(c)
    # updates read + rows written + indices; the table itself is not read
    assert 2 * ROWS + IDS <= got["bytes"] <= 2 * ROWS + 4 * IDS
    assert not any(x.opcode == "copy" for x in got["instructions"])
    assert got["naive_bytes"] == pytest.approx(xla_bytes(c), rel=0.01)


def test_combining_scatter_also_reads_the_rows_it_updates():
    table, ids, updates = operands()
    c = compiled(lambda t, i, u: t.at[i].add(u), table, ids, updates, donate=(0,))
    got = counted(c)
    assert 3 * ROWS + IDS <= got["bytes"] <= 3 * ROWS + 4 * IDS


def test_a_copy_of_the_whole_table_is_charged_in_full():
    table, ids, updates = operands()
    # not donated: the caller's table must survive, so XLA copies it before scattering
    c = compiled(lambda t, i, u: t.at[i].set(u), table, ids, updates)
    got = counted(c)
    copies = [x for x in got["instructions"] if x.opcode == "copy"]
    assert copies and copies[0].bytes == 2 * TABLE
    assert got["bytes"] >= 2 * TABLE + 2 * ROWS


def test_fused_gather_then_elementwise_reads_rows_of_the_table():
    table, ids, _ = operands()
    c = compiled(lambda t, i: jnp.tanh(t[i]) * 2.0 + 1.0, table, ids)
    got = counted(c)
    assert got["bytes"] <= 2 * ROWS + 4 * IDS < TABLE


def test_elementwise_pass_over_the_table_is_charged_in_full():
    table, _, _ = operands()
    c = compiled(lambda t: t * 2.0, table)
    assert counted(c)["bytes"] == 2 * TABLE


def test_slice_inside_a_fusion_reads_only_what_the_output_needs():
    table, ids, _ = operands()
    # the first 5 gathered rows: 5 rows and 5 indices read, 5 rows written
    c = compiled(lambda t, i: jnp.tanh(t[i])[:5], table, ids)
    five = 5 * D * 4
    assert 2 * five + 5 * 4 <= counted(c)["bytes"] <= 2 * five + 4 * 5 * 4


def test_shape_bytes_of_arrays_and_tuples():
    assert hlo_bytes.shape_bytes("f32[10,4]{1,0}") == 160
    assert hlo_bytes.shape_bytes("(f32[2,3]{1,0}, s32[], pred[8])") == 24 + 4 + 8
    assert hlo_bytes.shape_bytes("bf16[0,5]") == 0


def test_a_loop_with_a_run_time_bound_is_charged_the_callers_trips():
    """XLA knows no trip count for ``fori_loop(0, n)`` with a traced ``n``: the caller's
    ``unknown_trips`` multiply the body (here an in-place scatter-add of ``K`` rows)."""
    table, ids, updates = operands()

    def loop(table, ids, updates, n):
        return jax.lax.fori_loop(0, n, lambda i, t: t.at[ids].add(updates), table)

    text = compiled(loop, table, ids, updates, jnp.int32(3), donate=(0,)).as_text()

    def loops(trips: int) -> list:
        counted = hlo_bytes.row_aware_bytes(text, trips)
        assert counted["while_trip_counts_unknown"] == 1
        return [c for c in counted["instructions"] if c.opcode == "while"]

    (one,), (seven,) = loops(1), loops(7)
    assert seven.bytes == 7 * one.bytes
    assert 3 * ROWS + IDS <= one.bytes < TABLE  # rows read, added to, written; ids; no table


def test_whole_array_copies_lists_a_table_copied_before_an_update():
    """``whole_array_copies`` finds the copy XLA makes of a table it may not update in place
    (not donated), with its layout and bytes, and nothing once the table is donated."""
    table, ids, updates = operands()
    kept = compiled(lambda t, i, u: t.at[i].set(u), table, ids, updates).as_text()
    (copy,) = hlo_bytes.whole_array_copies(kept, [(V, D)])
    assert copy["shape"] == [V, D] and copy["bytes"] == 2 * TABLE
    assert copy["minor_to_major"] == "1,0"  # row-major, XLA:CPU's layout
    donated = compiled(lambda t, i, u: t.at[i].set(u), table, ids, updates, donate=(0,))
    assert hlo_bytes.whole_array_copies(donated.as_text(), [(V, D)]) == []
    # only the shapes asked about count: the rows themselves are no table
    assert hlo_bytes.whole_array_copies(kept, [(K, D)]) == []


def test_whole_array_copies_sees_a_transposing_fusion():
    """A table moved into another layout (a transpose, fused or not) is a whole-array copy."""
    table, _, _ = operands()
    text = compiled(lambda t: t.T + 0.0, table).as_text()
    found = hlo_bytes.whole_array_copies(text, [(D, V)])
    assert found and all(c["bytes"] == 2 * TABLE for c in found)


def test_whole_array_copies_reads_tpu_style_moves():
    """TPU programs move arrays with asynchronous copies (``copy-start`` returns a tuple) and
    with reshapes between tilings that layout assignment could not make bitcasts."""
    text = "\n".join(
        [
            "HloModule m",
            "ENTRY %main (p: f32[500,128]) -> f32[1000,64] {",
            "  %p = f32[500,128]{1,0:T(8,128)} parameter(0)",
            "  %r = f32[1000,64]{1,0:T(8,128)} reshape(%p)",
            "  %cs = (f32[1000,64]{0,1:T(8,128)}, f32[1000,64]{1,0:T(8,128)}, u32[])"
            " copy-start(%r)",
            "  ROOT %cd = f32[1000,64]{0,1:T(8,128)} copy-done(%cs)",
            "}",
        ]
    )
    found = hlo_bytes.whole_array_copies(text, [(1000, 64)])
    assert [(c["opcode"], c["minor_to_major"], c["bytes"]) for c in found] == [
        ("reshape", "1,0", 2 * 1000 * 64 * 4),
        ("copy-start", "0,1", 2 * 1000 * 64 * 4),
    ]


def test_the_accelerator_benchmark_counts_rows_not_their_padding_and_takes_a_2d_mesh():
    """``bench_accelerator``: the minimum charges a table row its ``dim`` floats however it is
    stored (a TPU's ``[rows / 2, 128]`` for width 48 has 16 floats of padding a row), a
    ``[rows]`` slot one value a row and a scalar nothing; ``--mesh`` and ``--strategy`` (with
    ``--tpu`` only) build the ``("data", "model")`` mesh and the layouts asked for."""
    import bench_accelerator as ba

    rows = 1000
    assert ba.row_bytes(np.zeros((rows // 2, 128), np.float32), rows, 48) == 48 * 4
    assert ba.row_bytes(np.zeros((rows, 64), np.float32), rows, 64) == 64 * 4
    assert ba.row_bytes(np.zeros((rows,), np.float32), rows, 48) == 4
    assert ba.row_bytes(np.zeros((), np.int32), rows, 48) == 0
    with pytest.raises(SystemExit):
        ba.parse_args(["--mesh", "2x4"])  # --mesh without --tpu: argparse's error
    args = ba.parse_args(["--tpu", "v5e:2x4", "--devices", "8", "--mesh", "2x4"])
    args.strategy, args.vocab = "column", 1000
    mesh = ba.mesh_of(args, jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert ba.make_embedding(args, mesh).plan["t0"].strategy == "column"
    for bad in ("3x3", "2x", "8"):
        with pytest.raises(SystemExit, match=f"--mesh {bad}: give DATAxMODEL"):
            ba.mesh_of(ba.parse_args(["--tpu", "v5e:2x4", "--mesh", bad]), jax.devices()[:8])


def _tpu_loop(op_name: str, start: int, bound: int) -> str:
    """A TPU-style module: a ``while`` with no ``known_trip_count`` whose counter runs from
    ``start`` (through a copy) while below ``bound``, each trip reading one 64-float row."""
    return "\n".join(
        [
            "HloModule m",
            "%cond (c: (s32[], f32[1000,64])) -> pred[] {",
            "  %c = (s32[], f32[1000,64]) parameter(0)",
            "  %k = s32[] constant(" + str(bound) + ")",
            "  %i = s32[] get-tuple-element(%c), index=0",
            "  ROOT %lt = pred[] compare(%i, %k), direction=LT",
            "}",
            "%body (b: (s32[], f32[1000,64])) -> (s32[], f32[1000,64]) {",
            "  %b = (s32[], f32[1000,64]) parameter(0)",
            "  %i = s32[] get-tuple-element(%b), index=0",
            "  %t = f32[1000,64]{1,0} get-tuple-element(%b), index=1",
            "  %z = s32[] constant(0)",
            "  %row = f32[1,64]{1,0} dynamic-slice(%t, %i, %z), dynamic_slice_sizes={1,64}",
            "  %t2 = f32[1000,64]{1,0} dynamic-update-slice(%t, %row, %i, %z)",
            "  %one = s32[] constant(1)",
            "  %j = s32[] add(%i, %one)",
            "  ROOT %out = (s32[], f32[1000,64]) tuple(%j, %t2)",
            "}",
            "ENTRY %main (p: f32[1000,64]) -> f32[1000,64] {",
            "  %p = f32[1000,64]{1,0} parameter(0)",
            "  %s = s32[] constant(" + str(start) + ")",
            "  %s1 = s32[] copy(%s)",
            "  %init = (s32[], f32[1000,64]) tuple(%s1, %p)",
            "  %w = (s32[], f32[1000,64]) while(%init), condition=%cond, body=%body,"
            f' metadata={{op_name="{op_name}"}}',
            "  ROOT %r = f32[1000,64]{1,0} get-tuple-element(%w), index=1",
            "}",
        ]
    )


def test_a_loop_bound_by_a_constant_is_charged_its_trips_without_xlas_count():
    """TPU programs carry no ``known_trip_count``: a loop whose condition is ``counter <
    constant``, the counter starting from a constant, is charged ``constant - start`` trips
    (each slicing one row out and writing one back here), not the caller's guess."""
    counted = hlo_bytes.row_aware_bytes(_tpu_loop("jit(f)/while", 2, 514), unknown_trips=7)
    assert counted["while_trip_counts_unknown"] == 0
    (loop,) = [c for c in counted["instructions"] if c.opcode == "while"]
    assert loop.detail["trips"] == 512
    per_trip, rest = divmod(loop.bytes, 512)
    row = 64 * 4
    assert rest == 0 and 4 * row <= per_trip < 5 * row  # a row sliced out and one written back


def test_expanded_loops_lists_the_loops_xla_made_of_gathers_and_scatters():
    """A ``while`` whose ``op_name`` ends in a gather or scatter is one XLA expanded (one trip
    per index); the loops a program wrote itself are not listed."""
    for op_name in ("jit(step)/while/body/gather", "jit(step)/scatter-add"):
        (loop,) = hlo_bytes.expanded_loops(_tpu_loop(op_name, 0, 28672))
        assert (loop["op_name"], loop["trips"]) == (op_name, 28672)
    assert hlo_bytes.expanded_loops(_tpu_loop("jit(step)/while", 0, 5)) == []


def test_a_scatter_in_a_nested_fusion_is_charged_the_rows_it_writes():
    """TPU wraps a scatter in a fusion inside the fusion that feeds it: the outer fusion's
    output is the inner scatter's, in place, so only the updated rows are written."""
    text = "\n".join(
        [
            "HloModule m",
            "%inner (a: f32[1000,64], i: s32[8,1], u: f32[8,64]) -> f32[1000,64] {",
            "  %a = f32[1000,64]{1,0} parameter(0)",
            "  %i = s32[8,1]{1,0} parameter(1)",
            "  %u = f32[8,64]{1,0} parameter(2)",
            "  ROOT %s = f32[1000,64]{1,0} scatter(%a, %i, %u), update_window_dims={1},"
            " inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1,"
            " to_apply=%set",
            "}",
            "%set (x: f32[], y: f32[]) -> f32[] {",
            "  %x = f32[] parameter(0)",
            "  ROOT %y = f32[] parameter(1)",
            "}",
            "%outer (t: f32[1000,64], i: s32[8,1], g: f32[8,64]) -> f32[1000,64] {",
            "  %t = f32[1000,64]{1,0} parameter(0)",
            "  %i = s32[8,1]{1,0} parameter(1)",
            "  %g = f32[8,64]{1,0} parameter(2)",
            "  %n = f32[8,64]{1,0} negate(%g)",
            "  ROOT %f = f32[1000,64]{1,0} fusion(%t, %i, %n), kind=kCustom, calls=%inner",
            "}",
            "ENTRY %main (t: f32[1000,64], i: s32[8,1], g: f32[8,64]) -> f32[1000,64] {",
            "  %t = f32[1000,64]{1,0} parameter(0)",
            "  %i = s32[8,1]{1,0} parameter(1)",
            "  %g = f32[8,64]{1,0} parameter(2)",
            "  ROOT %o = f32[1000,64]{1,0} fusion(%t, %i, %g), kind=kLoop, calls=%outer",
            "}",
        ]
    )
    (fusion,) = hlo_bytes.row_aware_bytes(text)["instructions"]
    rows = 8 * 64 * 4
    assert fusion.detail["written"] == rows  # not the 1000-row output
    assert fusion.bytes == rows + 8 * 4 + rows  # updates and indices read, rows written


def _tpu_step(set_root: str) -> str:
    """A TPU-style step: rows gathered from a table in device memory into on-chip memory
    (``S(1)``), a new value computed there, and scattered back in place (the scatter's
    combiner returning ``set_root``); the activations prefetched on chip by an asynchronous
    copy, and a slice of them taken by an asynchronous slice."""
    return "\n".join(
        [
            "HloModule m",
            "%set (x: f32[], y: f32[]) -> f32[] {",
            "  %x = f32[]{:T(128)} parameter(0)",
            "  %y = f32[]{:T(128)} parameter(1)",
            f"  ROOT %r = f32[]{{:T(128)}} {set_root}",
            "}",
            "%take (t: f32[1000,128], i: s32[8]) -> f32[8,128] {",
            "  %t = f32[1000,128]{1,0:T(8,128)} parameter(0)",
            "  %i = s32[8]{0:T(256)S(1)} parameter(1)",
            "  ROOT %g = f32[8,128]{1,0:T(8,128)S(1)} gather(%t, %i), offset_dims={1},"
            " collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1,"
            " slice_sizes={1,128}",
            "}",
            "%twice (r: f32[8,128]) -> f32[8,128] {",
            "  %r = f32[8,128]{1,0:T(8,128)S(1)} parameter(0)",
            "  ROOT %a = f32[8,128]{1,0:T(8,128)S(1)} add(%r, %r)",
            "}",
            "%put (t: f32[1000,128], i: s32[8], u: f32[8,128]) -> f32[1000,128] {",
            "  %t = f32[1000,128]{1,0:T(8,128)} parameter(0)",
            "  %i = s32[8]{0:T(256)S(1)} parameter(1)",
            "  %u = f32[8,128]{1,0:T(8,128)S(1)} parameter(2)",
            "  ROOT %s = f32[1000,128]{1,0:T(8,128)} scatter(%t, %i, %u),"
            " update_window_dims={1}, inserted_window_dims={0},"
            " scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%set",
            "}",
            "ENTRY %main (t: f32[1000,128], i: s32[8], a: f32[512,64]) -> (f32[1000,128],"
            " f32[64,64]) {",
            "  %t = f32[1000,128]{1,0:T(8,128)} parameter(0)",
            "  %i = s32[8]{0:T(256)S(1)} parameter(1)",
            "  %a = f32[512,64]{1,0:T(8,128)} parameter(2)",
            "  %g = f32[8,128]{1,0:T(8,128)S(1)} fusion(%t, %i), kind=kCustom, calls=%take",
            "  %n = f32[8,128]{1,0:T(8,128)S(1)} fusion(%g), kind=kLoop, calls=%twice",
            "  %s = f32[1000,128]{1,0:T(8,128)} fusion(%t, %i, %n), kind=kCustom, calls=%put",
            "  %cs = (f32[512,64]{1,0:T(8,128)S(1)}, f32[512,64]{1,0:T(8,128)}, u32[]{:S(2)})"
            " copy-start(%a)",
            "  %cd = f32[512,64]{1,0:T(8,128)S(1)} copy-done(%cs)",
            "  %ss = ((f32[512,64]{1,0:T(8,128)S(1)}), f32[64,64]{1,0:T(8,128)S(1)},"
            " s32[]{:S(2)}) slice-start(%cd), slice={[0:64], [0:64]}",
            "  %sd = f32[64,64]{1,0:T(8,128)S(1)} slice-done(%ss)",
            "  ROOT %o = (f32[1000,128]{1,0:T(8,128)}, f32[64,64]{1,0:T(8,128)S(1)})"
            " tuple(%s, %sd)",
            "}",
        ]
    )


def test_device_memory_only_leaves_out_what_moves_on_chip():
    """``device_memory_only`` counts the bytes that move to and from device memory (HBM):
    the rows gathered from the table and scattered back, the activations copied on chip once;
    not the on-chip gather output, the computation on it, the indices or the slice taken on
    chip. Without it, every access counts."""
    rows, acts, part = 8 * 128 * 4, 512 * 64 * 4, 64 * 64 * 4
    text = _tpu_step("bitcast(%y)")
    charges = hlo_bytes.row_aware_bytes(text)["instructions"]
    everything = {c.name: c.bytes for c in charges if c.bytes}
    assert everything == {
        "g": rows + 8 * 4 + rows,  # rows read, indices read, rows written
        "n": 2 * rows,
        "s": 8 * 4 + rows + rows,  # indices and updates read, rows written
        "cs": 2 * acts,  # read and written once: the done half and the aliases are free
        "ss": 2 * part,
    }
    in_hbm = hlo_bytes.row_aware_bytes(text, device_memory_only=True)
    assert {c.name: c.bytes for c in in_hbm["instructions"] if c.bytes} == {
        "g": rows,  # read from the table; written on chip
        "s": rows,  # written to the table; read on chip
        "cs": acts,  # read from device memory, written on chip
    }


def test_a_scatter_returning_its_update_through_a_bitcast_does_not_read_the_rows():
    """TPU writes a plain overwrite's combiner as ``bitcast(update)``: the scatter still
    reads no old rows; a combiner that reads the old value (an add) does."""
    rows = 8 * 128 * 4

    def scatter(root: str) -> int:
        text = _tpu_step(root)
        (s,) = [c for c in hlo_bytes.row_aware_bytes(text)["instructions"] if c.name == "s"]
        return s.bytes

    assert scatter("bitcast(%y)") == 8 * 4 + rows + rows
    assert scatter("add(%x, %y)") == 8 * 4 + rows + 2 * rows  # the old rows read too


@pytest.mark.parametrize("strategy", ["row", "table", "column", "replicated"])
def test_the_minimum_counts_the_rows_each_chip_updates(strategy):
    """``bench_accelerator``'s minimum on a 2x4 mesh: a device's shard is its row-major index
    on the shard axes; row-wise each distinct row is updated on one shard (``r mod T``),
    table-wise all of them on the table's shard, column-wise and replicated on every device."""
    import types

    import bench_accelerator as ba

    args = ba.parse_args(["--tpu", "v5e:2x4", "--devices", "8", "--mesh", "2x4"])
    args.strategy, args.vocab, args.features = strategy, 1000, 1
    mesh = ba.mesh_of(args, jax.devices()[:8])
    emb = ba.make_embedding(args, mesh)
    placement = emb.plan["t0"]
    shards = ba.device_shards(mesh, emb.plan.layout("t0"))
    distinct = np.arange(3, 1000, 7)
    updated = [ba.rows_updated(placement, distinct, t) for t in shards]
    expected = {
        "row": [int(np.sum(distinct % 8 == t)) for t in range(8)],
        "table": [len(distinct) if t == placement.shard else 0 for t in range(8)],
        "column": [len(distinct)] * 8,
        "replicated": [len(distinct)] * 8,
    }[strategy]
    assert updated == expected
    if strategy != "replicated":
        assert shards.tolist() == list(range(8))  # sharded over both axes, row-major
    model_only = types.SimpleNamespace(shard_axes=("model",))  # replicated over "data"
    assert ba.device_shards(mesh, model_only).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("optimizer", ["adagrad", "partial_rowwise_adam"])
def test_the_minimum_counts_slots_beside_the_rows_as_slots(monkeypatch, optimizer):
    """With a TPU's storage (``JAXEMBED_PACK_ROWS=always``) the accumulators (or momenta) are
    stored beside the rows in the table's array; ``bench_accelerator``'s minimum still counts
    the table's row and each slot's once: the same as with the slots apart, and as counted by
    hand (distinct rows x (table, table-shaped slots, row-wise slots) x 2 + the ids)."""
    import bench_accelerator as ba

    from jaxembed.sharding import PACK_ROWS_ENV

    args = ba.parse_args(["--vocab", "1000", "--batch", "64", "--optimizer", optimizer])
    ids = np.random.default_rng(0).integers(0, 1000, 320)
    inputs = {"f0": (ids, np.full(64, 5))}  # 5 ids for each of the 64 examples
    got = {}
    for where in ("always", "never"):
        monkeypatch.setenv(PACK_ROWS_ENV, where)
        emb = ba.make_embedding(args, jax.sharding.Mesh(jax.devices()[:1], ("x",)))
        state = emb.init(jax.random.key(0))
        assert bool(emb.plan.layout("t0").beside) == (where == "always")
        got[where] = ba.minimum_bytes(args, emb, state, inputs)["minimum_bytes"]
    row = 64 * 4
    per_row = {"adagrad": 2 * row, "partial_rowwise_adam": 2 * row + 4}[optimizer]
    assert got["always"] == got["never"] == 2 * len(np.unique(ids)) * per_row + 4 * 320
