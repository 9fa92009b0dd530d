"""``examples/train_2d_mesh.py``: a Flax tower FSDP-sharded over "data" and tables over "model"
(every strategy) on a (2, 4) mesh, in one jitted step, equal to the same training on one device.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_2d_mesh.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_2d_mesh", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("table_axes", ["model", "all"])
def test_2d_mesh_training_equals_one_device(table_axes, capsys):
    out = _load().main(["--steps", "4", "--table-axes", table_axes])
    sharded, single = out["sharded"], out["single"]
    plan = sharded["plan"]
    assert plan.batch_axes == ("data", "model")
    assert plan.table_axes == (("model",) if table_axes == "model" else ("data", "model"))
    assert {t.strategy for t in plan.tables} == {"row", "table", "column", "replicated"}
    assert plan["items"].cols_per_shard == (3 if table_axes == "model" else 2)  # 12 columns
    # The tower's [features, 32] kernel is split over "data" (FSDP), after the steps too.
    kernel = sharded["kernel"]
    assert kernel.sharding.spec == P("data")
    assert {s.data.shape[0] for s in kernel.addressable_shards} == {kernel.shape[0] // 2}
    for name, table in single["tables"].items():
        np.testing.assert_allclose(sharded["tables"][name], table, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5)
    assert "vs one device" in capsys.readouterr().out
