"""An independent numpy reference for jaxembed's training maths, and a shared test scenario.

Nothing here imports jaxembed internals: only the public configs (``TableConfig``,
``FeatureConfig``), the public inputs (``Sparse``, ``Ragged``) and the optimizer objects, whose
TF-named constructor arguments are read as plain attributes.

* ``row_gradients`` walks the raw inputs entry by entry and accumulates, per table, the dense
  ``[V, dim]`` gradient ``g_r = sum coeff * dL/dact`` and the set of touched rows, with TF's TPU
  coefficients (tf_semantics.md section 3.3) and TF's CPU pruning and layout rules (section 4).
* ``apply_optimizer`` applies the five TF TPU optimizer equations (section 3.4) with gradient
  clipping (3.5), decoupled weight decay from the pre-update row (3.6) and weight clamping, to
  the touched rows only (or to every row for ``Adam(lazy_adam=False)``), in float64; and
  FBGEMM's row-wise optimizers (``RowWiseAdagrad`` = ``EXACT_ROWWISE_ADAGRAD``,
  ``PartialRowWiseAdam`` = ``PARTIAL_ROWWISE_ADAM``) row by row (``apply_fbgemm_optimizer``).
* ``scenario_*`` build the mixed feature config and random batches used by several test files.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from tf_reference import flatten_with_paths  # tf.nest order; TF itself is not imported

import jaxembed as je

# ---------------------------------------------------------------------------------------------
# Nested structures (tf.nest order: dict keys sorted, lists and tuples in order)


def table_order(feature_config: Any) -> list[je.TableConfig]:
    """Tables by first appearance in ``tf.nest`` order (TF's rule)."""
    tables: dict[je.TableConfig, None] = {}
    for _, feature in flatten_with_paths(feature_config):
        tables.setdefault(feature.table, None)
    return list(tables)


# ---------------------------------------------------------------------------------------------
# (a) Per-row gradient accumulation

Contribution = tuple[tuple[int, ...], int, float]  # (position in the activation, id, coeff)


def _combined(groups: Mapping[tuple[int, ...], list[tuple[int, float]]], combiner: str):
    """Coefficients of combined features: w (sum), w/sum(w) (mean), w/sqrt(sum(w^2)) (sqrtn)."""
    out: list[Contribution] = []
    for pos, entries in groups.items():
        ws = [w for _, w in entries]
        if combiner == "sum":
            denom = 1.0
        elif combiner == "mean":
            denom = math.fsum(ws)
        else:
            denom = math.sqrt(math.fsum(w * w for w in ws))
        for i, w in entries:
            out.append((pos, int(i), 0.0 if denom == 0 else w / denom))
    return out


def contributions(inp: Any, weight: Any, feature: je.FeatureConfig) -> list[Contribution]:
    """Every (activation position, id, coefficient) of one feature, with TF's rules.

    Dense ids: one position per id, coefficient 1. Sparse: sequence features (rank 2,
    ``max_sequence_length`` L > 0, no ``output_shape``) keep columns < L with coefficient 1;
    otherwise entries are combined per ``indices[:-1]``, and with
    ``validate_weights_and_indices`` (or rank > 2) negative ids are pruned, and weights <= 0
    unless the combiner is sum. Ragged: nothing is pruned; ``output_shape`` reshapes the combined
    output (product == batch) or gives ``product // batch`` positions per example; L > 0 gives L
    positions per example; otherwise combined per example.
    """
    combiner = feature.table.combiner
    length = feature.max_sequence_length
    if isinstance(inp, je.Sparse):
        idx = np.asarray(inp.indices).reshape(-1, len(inp.dense_shape))
        ids = np.asarray(inp.values)
        ws = None if weight is None else np.asarray(weight.values, np.float64)
        rank = len(inp.dense_shape)
        if length > 0 and feature.output_shape is None and rank == 2:
            return [
                ((int(r), int(c)), int(i), 1.0)
                for (r, c), i in zip(idx, ids, strict=True)
                if c < length
            ]
        safe = feature.validate_weights_and_indices or rank > 2
        groups: dict[tuple[int, ...], list[tuple[int, float]]] = defaultdict(list)
        for k in range(ids.shape[0]):
            w = 1.0 if ws is None else float(ws[k])
            if safe and (ids[k] < 0 or (ws is not None and combiner != "sum" and w <= 0)):
                continue
            groups[tuple(int(x) for x in idx[k, :-1])].append((int(ids[k]), w))
        return _combined(groups, combiner)
    if isinstance(inp, je.Ragged):
        splits = np.asarray(inp.row_splits)
        vals = np.asarray(inp.values)
        ws = None if weight is None else np.asarray(weight.values, np.float64)
        batch = splits.shape[0] - 1
        rows = [
            [(int(vals[j]), 1.0 if ws is None else float(ws[j])) for j in range(lo, hi)]
            for lo, hi in zip(splits[:-1], splits[1:], strict=True)
        ]
        shape = feature.output_shape
        if shape is not None:
            size = math.prod(shape)
            if size == batch:
                groups = {
                    tuple(int(x) for x in np.unravel_index(b, shape)): rows[b] for b in range(batch)
                }
                return _combined(groups, combiner)
            per = size // batch
            return [
                (tuple(int(x) for x in np.unravel_index(b * per + c, shape)), i, 1.0)
                for b in range(batch)
                for c, (i, _) in enumerate(rows[b])
                if c < per
            ]
        if length > 0:
            return [
                ((b, c), i, 1.0)
                for b in range(batch)
                for c, (i, _) in enumerate(rows[b])
                if c < length
            ]
        return _combined({(b,): rows[b] for b in range(batch)}, combiner)
    ids = np.asarray(inp)
    return [(pos, int(ids[pos]), 1.0) for pos in np.ndindex(ids.shape)]


def row_gradients(
    inputs: Any, weights: Any, grads: Any, feature_config: Any
) -> dict[je.TableConfig, tuple[np.ndarray, np.ndarray]]:
    """Per table: ``(g [V, dim] float64, touched [V] bool)`` for one batch.

    ``grads`` (dL/d activations) has the structure of ``inputs``; a None leaf is a zero gradient
    whose rows still count as touched (``grads=None``: all zero). Every table of
    ``feature_config`` is in the result.
    """
    features = dict(flatten_with_paths(feature_config))
    flat_w = dict(flatten_with_paths(weights)) if weights is not None else {}
    flat_g = dict(flatten_with_paths(grads)) if grads is not None else {}
    out = {
        t: (np.zeros((t.vocabulary_size, t.dim)), np.zeros(t.vocabulary_size, bool))
        for t in table_order(feature_config)
    }
    for path, inp in flatten_with_paths(inputs):
        feature = features[path]
        g_table, touched = out[feature.table]
        dact = flat_g.get(path)
        for pos, i, coeff in contributions(inp, flat_w.get(path), feature):
            touched[i] = True
            if dact is not None:
                g_table[i] += coeff * np.asarray(dact, np.float64)[pos]
    return out


# ---------------------------------------------------------------------------------------------
# (b) The TF TPU optimizer equations, float64


def learning_rate(opt: Any, step: int) -> float:
    lr = opt.learning_rate
    return float(np.asarray(lr(step))) if callable(lr) else float(lr)


def slot_names(opt: Any) -> tuple[str, ...]:
    return {
        "SGD": (),
        "Adagrad": ("accumulators",),
        "AdagradMomentum": ("accumulators", "momenta"),
        "Adam": ("momenta", "velocities"),
        "FTRL": ("accumulators", "linears"),
        "RowWiseAdagrad": ("accumulators",),
        "PartialRowWiseAdam": ("momenta", "velocities"),
    }[type(opt).__name__]


def initial_slots(opt: Any, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """TF's initial slot values: Adagrad/FTRL accumulators = initial_accumulator_value, else 0.

    FBGEMM's row-wise optimizers: ``accumulators`` ``[V]`` = initial_accumulator_value;
    ``momenta`` ``[V, dim]`` and ``velocities`` ``[V]`` = 0.
    """
    if type(opt).__name__ == "RowWiseAdagrad":
        return {"accumulators": np.full(shape[:1], float(opt.initial_accumulator_value))}
    if type(opt).__name__ == "PartialRowWiseAdam":
        return {"momenta": np.zeros(shape), "velocities": np.zeros(shape[:1])}
    init = getattr(opt, "initial_accumulator_value", 0.0)
    if type(opt).__name__ == "AdagradMomentum":
        init = 0.0
    return {
        name: np.full(shape, init if name == "accumulators" else 0.0) for name in slot_names(opt)
    }


def _sgd(opt, w, s, g, lr):
    return w - lr * g, s


def _adagrad(opt, w, s, g, lr):
    a = s["accumulators"] + g * g
    return w - lr * g / np.sqrt(a), {"accumulators": a}


def _adagrad_momentum(opt, w, s, g, lr):
    if opt.beta2 == 1:
        a = s["accumulators"] + g * g
    else:
        a = opt.beta2 * s["accumulators"] + (1 - opt.beta2) * g * g
    scaled = g * (a + opt.epsilon) ** (-1.0 / opt.exponent)
    m = opt.momentum * s["momenta"] + scaled
    update = opt.momentum * m + scaled if opt.use_nesterov else m
    return w - lr * update, {"accumulators": a, "momenta": m}


def _adam(opt, w, s, g, lr):
    m = opt.beta_1 * s["momenta"] + (1 - opt.beta_1) * g
    v = opt.beta_2 * s["velocities"] + (1 - opt.beta_2) * g * g
    if opt.sum_inside_sqrt:
        denom = np.sqrt(v + opt.epsilon**2)
    else:
        denom = np.sqrt(v) + opt.epsilon
    return w - lr * m / denom, {"momenta": m, "velocities": v}


def _ftrl(opt, w, s, g, lr):
    p = opt.learning_rate_power
    l1, l2, beta = opt.l1_regularization_strength, opt.l2_regularization_strength, opt.beta
    a, lin = s["accumulators"], s["linears"]
    new_a = a + g * g
    new_pow = new_a ** (-p)
    delta = new_pow - a ** (-p)
    if opt.multiply_linear_by_learning_rate:
        lin = lin + lr * g - delta * w
        w = (np.clip(lin, -lr * l1, lr * l1) - lin) / (new_pow + 2 * lr * l2 + beta)
    else:
        lin = lin + g - delta * w / lr
        w = (np.clip(lin, -l1, l1) - lin) / ((new_pow + beta) / lr + 2 * l2)
    return w, {"accumulators": new_a, "linears": lin}


RULES: dict[str, Callable] = {
    "SGD": _sgd,
    "Adagrad": _adagrad,
    "AdagradMomentum": _adagrad_momentum,
    "Adam": _adam,
    "FTRL": _ftrl,
}


def clip_bounds(clipvalue: Any) -> tuple[float | None, float | None]:
    if clipvalue is None:
        return None, None
    if isinstance(clipvalue, tuple):
        return clipvalue
    return -clipvalue, clipvalue


def apply_optimizer(
    opt: Any,
    w: np.ndarray,
    slots: Mapping[str, np.ndarray],
    g: np.ndarray,
    touched: np.ndarray,
    step: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One TF TPU optimizer step on the touched rows (every row for non-lazy Adam).

    Order per row: clip g to ``clipvalue`` -> the optimizer's rule -> decoupled weight decay
    ``w_new - wd * w_old`` (``wd`` times lr when asked) -> clamp to ``clip_weight_min/max``.
    """
    if type(opt).__name__ in FBGEMM_RULES:
        return apply_fbgemm_optimizer(opt, w, slots, g, touched, step)
    rows = np.ones_like(touched) if not getattr(opt, "lazy_adam", True) else touched
    lr = learning_rate(opt, step)
    w_old = w[rows]
    g_rows = g[rows]
    lo, hi = clip_bounds(opt.clipvalue)
    if lo is not None or hi is not None:
        g_rows = np.clip(g_rows, lo, hi)
    new_w, new_s = RULES[type(opt).__name__](
        opt, w_old, {k: v[rows] for k, v in slots.items()}, g_rows, lr
    )
    if opt.weight_decay_factor:
        wd = opt.weight_decay_factor * (
            lr if opt.multiply_weight_decay_factor_by_learning_rate else 1.0
        )
        new_w = new_w - wd * w_old
    if opt.clip_weight_min is not None or opt.clip_weight_max is not None:
        new_w = np.clip(new_w, opt.clip_weight_min, opt.clip_weight_max)
    w, slots = w.copy(), {k: v.copy() for k, v in slots.items()}
    w[rows] = new_w
    for k in slots:
        slots[k][rows] = new_s[k]
    return w, slots


# ---------------------------------------------------------------------------------------------
# (c) FBGEMM's row-wise optimizers, float64, one row at a time
#
# From fbgemm_gpu/codegen/genscript/optimizers.py (rowwise_adagrad, partial_rowwise_adam) and
# the TBE module, which adds 1 to its `iter` before every update (so t = step + 1).


def _fbgemm_rowwise_adagrad(opt, w, acc, g, lr, t):
    """EXACT_ROWWISE_ADAGRAD on one row: weight decay mode 1 (L2) adds wd * w to the gradient
    of the row statistic and shrinks w by (1 - multiplier * wd); mode 2 (decoupled) shrinks w by
    (1 - lr * wd); the row moves by multiplier times the plain gradient."""
    wd, mode = opt.weight_decay, opt.weight_decay_mode
    squares = 0.0
    for d in range(w.shape[0]):
        gd = g[d] + wd * w[d] if mode == "l2" else g[d]
        squares += gd * gd
    acc = acc + squares / w.shape[0]
    multiplier = lr / (math.sqrt(acc) + opt.epsilon)
    if mode == "l2":
        correction = 1.0 - multiplier * wd
    elif mode == "decoupled":
        correction = 1.0 - lr * wd
    else:
        correction = 1.0
    new_w = np.array([correction * w[d] - g[d] * multiplier for d in range(w.shape[0])])
    return new_w, {"accumulators": acc}


def _fbgemm_partial_rowwise_adam(opt, w, slots, g, lr, t):
    """PARTIAL_ROWWISE_ADAM on one row: v (one value) from the mean of g^2, m element-wise,
    both bias-corrected with the global iteration t."""
    m, v = slots["momenta"], slots["velocities"]
    g_avg_square = sum(x * x for x in g) / w.shape[0]
    v = g_avg_square * (1.0 - opt.beta_2) + v * opt.beta_2
    v_hat = v / (1.0 - opt.beta_2**t)
    m = opt.beta_1 * m + (1.0 - opt.beta_1) * g
    new_w = w - lr * (
        m / (1.0 - opt.beta_1**t) / (math.sqrt(v_hat) + opt.epsilon) + opt.weight_decay * w
    )
    return new_w, {"momenta": m, "velocities": v}


FBGEMM_RULES = ("RowWiseAdagrad", "PartialRowWiseAdam")


def apply_fbgemm_optimizer(
    opt: Any,
    w: np.ndarray,
    slots: Mapping[str, np.ndarray],
    g: np.ndarray,
    touched: np.ndarray,
    step: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One FBGEMM row-wise optimizer step on the touched rows (``step`` = previous steps)."""
    lr, t = learning_rate(opt, step), step + 1
    w, slots = w.copy(), {k: v.copy() for k, v in slots.items()}
    for r in np.flatnonzero(touched):
        if type(opt).__name__ == "RowWiseAdagrad":
            w[r], new = _fbgemm_rowwise_adagrad(opt, w[r], slots["accumulators"][r], g[r], lr, t)
        else:
            row = {k: v[r] for k, v in slots.items()}
            w[r], new = _fbgemm_partial_rowwise_adam(opt, w[r], row, g[r], lr, t)
        for k, value in new.items():
            slots[k][r] = value
    return w, slots


class ReferenceTrainer:
    """Float64 tables and slots, trained with ``row_gradients`` + ``apply_optimizer``.

    Args:
        feature_config: The nested ``FeatureConfig`` structure.
        optimizer: Global optimizer; ``TableConfig.optimizer`` overrides it per table.
        tables: ``{TableConfig: initial table}``.
        slots: ``{TableConfig: {slot: initial array}}``; None gives TF's initial values.
    """

    def __init__(self, feature_config, optimizer, tables, slots=None):
        self.feature_config = feature_config
        self.optimizers = {
            t: t.optimizer if t.optimizer is not None else optimizer
            for t in table_order(feature_config)
        }
        self.tables = {t: np.asarray(v, np.float64).copy() for t, v in tables.items()}
        self.slots = {
            t: (
                {k: np.asarray(v, np.float64).copy() for k, v in slots[t].items()}
                if slots is not None
                else initial_slots(opt, self.tables[t].shape)
            )
            for t, opt in self.optimizers.items()
        }
        self.step = 0
        self.ever_touched = {t: np.zeros(t.vocabulary_size, bool) for t in self.optimizers}

    def apply(self, inputs, weights, grads) -> None:
        for t, (g, touched) in row_gradients(inputs, weights, grads, self.feature_config).items():
            self.ever_touched[t] |= touched
            self.tables[t], self.slots[t] = apply_optimizer(
                self.optimizers[t], self.tables[t], self.slots[t], g, touched, self.step
            )
        self.step += 1


# ---------------------------------------------------------------------------------------------
# Shared scenario: three tables (mean / sqrtn / sum) and every input kind.
#
# Ids that the random part never draws mark rows that must stay untouched:
#   items (V=16): random ids in [0, 10); 12 only with weight <= 0 in "hist" (mean: pruned);
#                 14 only past max_sequence_length in "seq" (truncated); 10, 11, 13, 15 unused.
#   tags  (V=12): random ids in [0, 8); 8..11 unused.
#   users (V=10): random ids in [0, 6); 7 only with weight 0 in "friends" (sum: kept, touched);
#                 8 only past max_sequence_length in "ctx"; 6, 9 unused.

BATCH = 4


def scenario_feature_config(users_optimizer: Any = None, items_optimizer: Any = None) -> dict:
    """The mixed feature config; the optimizers override the global one for those tables."""
    items = je.TableConfig(16, 4, combiner="mean", name="items", optimizer=items_optimizer)
    tags = je.TableConfig(12, 3, combiner="sqrtn", name="tags")
    users = je.TableConfig(10, 2, combiner="sum", name="users", optimizer=users_optimizer)
    return {
        "hist": je.FeatureConfig(items, name="hist"),  # weighted sparse, pruned entries
        "clicks": je.FeatureConfig(items),  # ragged, an empty row
        "seq": je.FeatureConfig(items, max_sequence_length=3),  # ragged sequence
        "cand": je.FeatureConfig(items),  # dense [B, 2]
        "tags": je.FeatureConfig(tags),  # unweighted sparse
        "tags_w": je.FeatureConfig(tags),  # weighted ragged
        "tags3": je.FeatureConfig(tags),  # rank-3 sparse
        "friends": je.FeatureConfig(users),  # weighted ragged, sum, a zero weight
        "friends_hd": je.FeatureConfig(users, output_shape=(2, 4)),  # 2 positions per example
        "ctx": (je.FeatureConfig(users, max_sequence_length=2),),  # sparse sequence
    }


def _pool_ids(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """n ids from a small per-example pool, so duplicates within an example are common."""
    pool = rng.choice(vocab, size=max(1, min(3, n)), replace=False)
    return rng.choice(pool, size=n).astype(np.int64)


def _sparse(rows: list[list[int]], width: int, extra_lead: tuple[int, ...] = ()):
    indices = [
        [*np.unravel_index(r, extra_lead or (len(rows),)), c]
        for r, row in enumerate(rows)
        for c in range(len(row))
    ]
    indices = np.asarray(indices, np.int64).reshape(-1, len(extra_lead or (0,)) + 1)
    values = np.asarray([v for row in rows for v in row])
    return indices, values, [*(extra_lead or (len(rows),)), width]


def scenario_batch(rng: np.random.Generator) -> tuple[dict, dict]:
    """Random ``(inputs, weights)`` for ``scenario_feature_config`` (batch 4)."""
    b = BATCH
    # hist: weighted sparse [4, 6], mean; plus entries the safe path prunes.
    rows = [list(_pool_ids(rng, int(rng.integers(1, 5)), 10)) for _ in range(b)]
    wrows = [list(rng.uniform(0.25, 2.0, len(r))) for r in rows]
    for r, (i, w) in enumerate([(-1, 1.0), (12, 0.0), (12, -0.5), (-3, 0.7)]):
        rows[r].append(i)
        wrows[r].append(w)
    idx, vals, shape = _sparse(rows, 6)
    hist = je.Sparse(idx, vals, shape)
    hist_w = je.Sparse(idx, np.asarray([w for r in wrows for w in r], np.float32), shape)

    clicks_len = rng.integers(0, 5, b)
    clicks_len[1] = 0
    clicks = je.Ragged.from_row_lengths(
        np.concatenate([_pool_ids(rng, int(n), 10) for n in clicks_len]), clicks_len
    )

    seq_len = rng.integers(1, 6, b)
    seq_len[0] = 5
    seq_ids = np.concatenate(
        [np.r_[_pool_ids(rng, min(int(n), 3), 10), [14] * max(0, n - 3)] for n in seq_len]
    )
    seq = je.Ragged.from_row_lengths(seq_ids.astype(np.int64), seq_len)

    cand = rng.integers(0, 10, (b, 2)).astype(np.int32)

    tag_rows = [list(_pool_ids(rng, int(rng.integers(1, 6)), 8)) for _ in range(b)]
    tags = je.Sparse(*_sparse(tag_rows, 5))

    tw_len = rng.integers(1, 5, b)
    tags_w = je.Ragged.from_row_lengths(
        np.concatenate([_pool_ids(rng, int(n), 8) for n in tw_len]), tw_len
    )
    tags_w_w = je.Ragged.from_row_lengths(
        rng.uniform(0.2, 2.0, int(tw_len.sum())).astype(np.float32), tw_len
    )

    t3_rows = [list(_pool_ids(rng, int(rng.integers(0, 4)), 8)) for _ in range(b * 2)]
    t3_rows[0] = t3_rows[0] or [1]
    tags3 = je.Sparse(*_sparse(t3_rows, 3, extra_lead=(b, 2)))

    fr_len = rng.integers(1, 4, b)
    fr_ids = [_pool_ids(rng, int(n), 6) for n in fr_len]
    fr_w = [rng.uniform(-1.0, 2.0, int(n)) for n in fr_len]
    fr_ids[0], fr_w[0] = np.r_[fr_ids[0], 7], np.r_[fr_w[0], 0.0]
    fr_len[0] += 1
    friends = je.Ragged.from_row_lengths(np.concatenate(fr_ids), fr_len)
    friends_w = je.Ragged.from_row_lengths(np.concatenate(fr_w).astype(np.float32), fr_len)

    hd_len = rng.integers(0, 4, b)
    friends_hd = je.Ragged.from_row_lengths(
        np.concatenate([_pool_ids(rng, int(n), 6) for n in hd_len] + [np.zeros(0, np.int64)]),
        hd_len,
    )

    ctx_idx, ctx_vals = [], []
    for r in range(b):
        cols = np.sort(rng.choice(4, size=int(rng.integers(1, 4)), replace=False))
        for c in cols:
            ctx_idx.append([r, c])
            ctx_vals.append(int(rng.integers(0, 6)) if c < 2 else 8)
    ctx = je.Sparse(ctx_idx, np.asarray(ctx_vals, np.int64), [b, 4])

    inputs = {
        "hist": hist,
        "clicks": clicks,
        "seq": seq,
        "cand": cand,
        "tags": tags,
        "tags_w": tags_w,
        "tags3": tags3,
        "friends": friends,
        "friends_hd": friends_hd,
        "ctx": (ctx,),
    }
    weights = {k: None for k in inputs}
    weights.update(hist=hist_w, tags_w=tags_w_w, friends=friends_w, ctx=(None,))
    return inputs, weights


# Rows of each table the scenario never touches (whatever the seed).
SCENARIO_UNTOUCHED = {"items": [10, 11, 12, 13, 14, 15], "tags": [8, 9, 10, 11], "users": [6, 8, 9]}


def activation_shapes(inputs: Any, feature_config: Any) -> dict[str, tuple[int, ...]]:
    """``{path: activation shape}`` for the scenario's inputs, from TF's shape rules."""
    features = dict(flatten_with_paths(feature_config))
    shapes = {}
    for path, inp in flatten_with_paths(inputs):
        f = features[path]
        dim = f.table.dim
        if isinstance(inp, je.Sparse):
            lead = inp.dense_shape[:-1]
            if f.max_sequence_length and f.output_shape is None and len(inp.dense_shape) == 2:
                lead = (*lead, f.max_sequence_length)
        elif isinstance(inp, je.Ragged):
            if f.output_shape is not None:
                lead = f.output_shape
            elif f.max_sequence_length:
                lead = (len(inp.row_splits) - 1, f.max_sequence_length)
            else:
                lead = (len(inp.row_splits) - 1,)
        else:
            lead = np.shape(inp)
        shapes[path] = (*lead, dim)
    return shapes


def random_grads(rng: np.random.Generator, inputs: Any, feature_config: Any, scale=1.0) -> Any:
    """Random float32 dL/d activations, nested like ``inputs`` (dict of leaves / tuples)."""
    shapes = activation_shapes(inputs, feature_config)

    def build(tree, prefix=""):
        if isinstance(tree, Mapping):
            return {k: build(v, f"{prefix}/{k}" if prefix else k) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(
                build(v, f"{prefix}/{i}" if prefix else str(i)) for i, v in enumerate(tree)
            )
        return (scale * rng.normal(size=shapes[prefix])).astype(np.float32)

    return build(inputs)


def batch_signature(emb: je.Embedding, inputs: Any, weights: Any) -> Any:
    """What a jitted step specialises on: the preprocessed batch's structure and shapes."""
    import jax

    batch = emb.preprocess(inputs, weights)
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return treedef, tuple(np.shape(x) for x in leaves)


def scenario_batches(n: int, seed: int = 0) -> list[tuple[dict, dict]]:
    """``n`` random scenario batches whose preprocessed shapes are equal (one compilation)."""
    emb = je.Embedding(scenario_feature_config())
    rng = np.random.default_rng(seed)
    first = scenario_batch(rng)
    want = batch_signature(emb, *first)
    out = [first]
    for _ in range(500):
        if len(out) == n:
            return out
        candidate = scenario_batch(rng)
        if batch_signature(emb, *candidate) == want:
            out.append(candidate)
    raise AssertionError("could not draw scenario batches of equal shapes")


# ---------------------------------------------------------------------------------------------
# Compact scenario: one weighted sparse feature (mean) on one table, fixed layout, so that every
# step has the same shapes. Each step draws 5-6 distinct ids from [0, 10) (rows change from step
# to step), with duplicates within and across examples, plus entries the safe path prunes
# (a negative id; id 12 with weight 0 and -0.5). Rows 10..15 are never touched.

COMPACT_LENGTHS = (3, 4, 2, 4)
COMPACT_UNTOUCHED = [10, 11, 12, 13, 14, 15]


def compact_feature_config(optimizer: Any = None) -> dict:
    items = je.TableConfig(16, 4, combiner="mean", name="items", optimizer=optimizer)
    return {"hist": je.FeatureConfig(items, name="hist")}


def compact_batch(rng: np.random.Generator) -> tuple[dict, dict]:
    distinct = rng.choice(10, size=6, replace=False)
    ids = np.r_[distinct, rng.choice(distinct, size=sum(COMPACT_LENGTHS) - 6)]
    rng.shuffle(ids)
    rows = [list(r) for r in np.split(ids, np.cumsum(COMPACT_LENGTHS)[:-1])]
    rows[1][1] = rows[1][0]  # a duplicate within one example
    wrows = [list(rng.uniform(0.25, 2.0, len(r))) for r in rows]
    for r, (i, w) in enumerate([(-1, 1.0), (12, 0.0), (12, -0.5)]):
        rows[r].append(i)
        wrows[r].append(w)
    idx, vals, shape = _sparse(rows, 6)
    inputs = {"hist": je.Sparse(idx, vals.astype(np.int64), shape)}
    weights = {"hist": je.Sparse(idx, np.asarray([w for r in wrows for w in r], np.float32), shape)}
    return inputs, weights


def compact_batches(n: int, seed: int = 0) -> list[tuple[dict, dict]]:
    rng = np.random.default_rng(seed)
    return [compact_batch(rng) for _ in range(n)]
