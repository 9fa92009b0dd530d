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
