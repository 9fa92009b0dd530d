"""The tiny model of the checkpoint fault tests, shared by the tests and their worker process.

Two tables: ``noisy`` holds random bit patterns (incompressible, so its bytes sit raw in the
stored chunk and a test can find and flip them) and ``packed`` holds values from a set of four
(compressible, so it is stored zstd-compressed). Adagrad gives each table an ``accumulators``
slot: random bit patterns for ``noisy`` (found and flipped like the table), a constant for
``packed`` (so small once compressed that OCDBT stores it inline, leaving ``packed`` the only
compressed chunk in the data files). ``state_for(emb, step, writer)`` is a different state for
every step and writer, the same in every process.
"""

from __future__ import annotations

import numpy as np

import jaxembed as je

NOISY = (64, 8)
PACKED = (256, 16)


def embedding() -> je.Embedding:
    noisy = je.TableConfig(*NOISY, name="noisy")
    packed = je.TableConfig(*PACKED, name="packed")
    features = {"n": je.FeatureConfig(noisy), "p": je.FeatureConfig(packed)}
    return je.Embedding(features, je.optimizers.Adagrad(0.1))


def logical(step: int, writer: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``{"tables": {name: array}, "slots": {name: {"accumulators": array}}}`` of a step."""
    rng = np.random.default_rng([step, writer])

    def noise() -> np.ndarray:
        bits = rng.integers(0, 2**32, NOISY, dtype=np.uint32).view(np.float32)
        return np.where(np.isfinite(bits), bits, np.float32(step)).astype(np.float32)

    packed = rng.choice(np.float32([0.5, -0.25, 1.0, 2.0 + step]), PACKED).astype(np.float32)
    return {
        "tables": {"noisy": noise(), "packed": packed},
        "slots": {
            "noisy": {"accumulators": noise()},
            "packed": {"accumulators": np.full(PACKED, 0.1 + step, np.float32)},
        },
    }


def state_for(emb: je.Embedding, step: int, writer: int = 0) -> je.EmbeddingState:
    values = logical(step, writer)
    return emb.state_from_logical(values["tables"], values["slots"], step)


def assert_state_is(emb: je.Embedding, state: je.EmbeddingState, step: int, writer: int = 0):
    """Bit-exact comparison of a restored state with ``state_for(emb, step, writer)``."""
    values = logical(step, writer)
    for table, array in emb.embedding_tables(state).items():
        np.testing.assert_array_equal(
            np.asarray(array), values["tables"][table.name], err_msg=f"step {step} {table.name}"
        )
    for name, slots in emb.logical_slots(state).items():
        np.testing.assert_array_equal(
            np.asarray(slots["accumulators"]),
            values["slots"][name]["accumulators"],
            err_msg=f"step {step} slots of {name}",
        )
    assert int(state.step) == step
