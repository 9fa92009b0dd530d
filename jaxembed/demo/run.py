"""The main job, end to end: train a sharded recommender, checkpoint, export, serve, compare.

``jaxembed demo --out DIR`` calls ``run``: a click log (synthetic, or MovieLens), the DLRM-style
model of ``jaxembed.demo.model`` trained on every local device (tables sharded, batch
data-parallel) with jaxembed's Adagrad for the tables and Optax's Adam for the tower, orbax
checkpoints that hold the tower too (a ``DenseModel``: ``jaxembed export DIR/checkpoints OUT``
serves the whole model), a SavedModel for CPU TF Serving, the SavedModel's predictions from a fresh
TensorFlow-only process compared with JAX's, and a PNG of the training curve and of the ids each
shard served. Everything lands in ``DIR``; ``DIR/demo.log`` has the report.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import jaxembed as je
from jaxembed.demo import data, model
from jaxembed.demo.config import (
    LOG_HEADER,
    DemoConfig,
    check_data,
    check_devices,
    check_options,
    check_previous_run,
    clear_previous_run,
)

__all__ = ["DemoConfig", "run"]


def _write_atomic(path: Path, data_bytes: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data_bytes)
    os.replace(tmp, path)


def _load(config: DemoConfig) -> tuple[data.ClickLog, data.ClickLog, str]:
    if config.movielens is not None:
        log = data.movielens(config.movielens, history_length=config.history_length)
        name = f"MovieLens ({config.movielens})"
    else:
        log = data.synthetic(
            config.examples,
            users=config.users,
            items=config.items,
            categories=config.categories,
            history_length=config.history_length,
            seed=config.seed,
        )
        name = "synthetic click log"
    train, test = log.split(0.1, config.seed)
    return train, test, name


def _batches(log: data.ClickLog, batch_size: int, steps: int, seed: int):
    """``steps`` batches of ``batch_size`` rows, reshuffled every epoch."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(log))
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = rng.permutation(len(log)), 0
        yield log.take(np.sort(order[position : position + batch_size]))
        position += batch_size


def _shard_counts(emb: je.Embedding, batch_log: data.ClickLog) -> dict[str, np.ndarray]:
    """How many ids of ``batch_log`` each device serves, per table."""
    ids = {
        "users": batch_log.user,
        "items": np.concatenate([batch_log.item, batch_log.history.values]),
        "categories": batch_log.categories.values,
    }
    counts = {}
    for name, table_ids in ids.items():
        layout = emb.plan.layout(name)
        if layout.num_shards > 1:
            counts[name] = layout.shard_loads(name, np.asarray(table_ids, np.int64))
    return counts


def _plot(path: Path, history: dict, shard_counts: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_shards) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot(history["step"], history["loss"], color="tab:blue", label="train loss (EMA)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("log loss", color="tab:blue")
    ax_auc = ax_loss.twinx()
    ax_auc.plot(history["eval_step"], history["auc"], "o-", color="tab:orange", label="test AUC")
    ax_auc.set_ylabel("test AUC", color="tab:orange")
    ax_loss.set_title("training")
    width = 0.8 / max(1, len(shard_counts))
    for i, (name, counts) in enumerate(shard_counts.items()):
        x = np.arange(len(counts)) + i * width
        ax_shards.bar(x, counts / 1e3, width=width, label=name)
    ax_shards.set_xlabel("device")
    ax_shards.set_ylabel("ids served (thousands)")
    ax_shards.set_title("ids per shard (row-sharded tables, all steps)")
    ax_shards.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _dense_model(params: Any) -> je.checkpoint.DenseModel:
    """The tower as a checkpoint stores it: ``model.predict``'s import path and its params, so
    ``jaxembed export out/checkpoints OUT`` serves the whole model, as the demo's own export."""
    return je.checkpoint.DenseModel("jaxembed.demo.model:predict", params)


def _train_step(emb: je.Embedding, tx: optax.GradientTransformation):
    @jax.jit
    def step(state, params, opt_state, batch, labels):
        def loss_fn(params, acts):  # summed: a row's gradient is the total over its examples
            logits = model.Tower().apply(params, acts)
            return optax.sigmoid_binary_cross_entropy(logits, labels).sum()

        acts = emb.lookup(state, batch)
        loss, (param_grads, act_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, acts)
        loss = loss / labels.shape[0]  # reported as the mean
        updates, opt_state = tx.update(param_grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return emb.apply_gradients(state, batch, act_grads), params, opt_state, loss

    return step


def run(config: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Runs the demo; returns the summary it also writes to ``out/metrics.json``.

    Every option is checked before anything is written (``jaxembed.demo.config``). An ``out``
    that holds a previous run is refused unless ``config.overwrite``, which deletes only the
    previous run's demo outputs, after the checks pass, and says so in the log.

    Raises:
        ValueError, TypeError, FileExistsError, NotADirectoryError, FileNotFoundError: a bad
            option, naming it, the offending value and the fix.
    """
    check_options(config)
    previous = check_previous_run(config)
    console = console or Console(record=True, soft_wrap=True)
    out = Path(config.out)
    started = time.perf_counter()
    devices = jax.devices()
    check_devices(config, len(devices))
    train, test, dataset = _load(config)
    check_data(config, len(devices), len(train), len(test))
    mesh = jax.make_mesh((len(devices),), ("x",))
    batch_size = config.batch_size
    console.print(f"[bold]{LOG_HEADER}[/bold]: writing to {out}")
    if previous:
        console.print(clear_previous_run(out, previous))
    # demo.log from the start: it marks ``out`` as the demo's even if this run is interrupted
    _write_atomic(out / "demo.log", console.export_text(clear=False).encode())
    console.print(
        f"{dataset}: {len(train):,} training / {len(test):,} test impressions; vocabularies "
        f"{train.vocab}"
    )
    console.print(f"{len(devices)} {devices[0].platform.upper()} devices; batch {batch_size}")
    if devices[0].platform == "cpu":
        console.print(je.cpu_kernels_status())

    features = model.feature_config(train.vocab, config.dim, config.history_length)
    optimizer = je.optimizers.Adagrad(config.embedding_learning_rate)
    # users and items row-sharded even when small; the plan replicates the categories table
    emb = je.Embedding(features, optimizer, mesh=mesh, sharding={"users": "row", "items": "row"})
    console.print(str(emb.plan))
    state = emb.init(jax.random.key(config.seed))
    tx = optax.adam(config.dense_learning_rate)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    eval_log = test.take(
        np.arange(min(config.eval_examples, len(test)) // len(devices) * len(devices))
    )
    eval_batch = emb.preprocess(*model.inputs(eval_log))
    params = model.Tower().init(jax.random.key(config.seed + 1), emb.lookup(state, eval_batch))
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
    step_fn = _train_step(emb, tx)

    @jax.jit
    def evaluate(state, params, batch):
        return jax.nn.sigmoid(model.Tower().apply(params, emb.lookup(state, batch)))

    history: dict[str, list] = {"step": [], "loss": [], "eval_step": [], "auc": []}
    shard_counts: dict[str, np.ndarray] = {}
    ema = None
    checkpoints = je.checkpoint.CheckpointManager(
        out / "checkpoints", emb, max_to_keep=2, save_interval_steps=max(1, config.steps // 2)
    )
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    train_started = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("training", total=config.steps)
        auc = float("nan")
        for i, batch_log in enumerate(_batches(train, batch_size, config.steps, config.seed)):
            step = i + 1
            batch = emb.preprocess(*model.inputs(batch_log))
            labels = jnp.asarray(batch_log.label)
            state, params, opt_state, loss = step_fn(state, params, opt_state, batch, labels)
            for name, counts in _shard_counts(emb, batch_log).items():
                shard_counts[name] = shard_counts.get(name, 0) + counts
            loss = float(loss)
            ema = loss if ema is None else 0.95 * ema + 0.05 * loss
            history["step"].append(step)
            history["loss"].append(ema)
            if step % config.eval_every == 0 or step == config.steps:
                scores = np.asarray(evaluate(state, params, eval_batch))
                auc = model.auc(eval_log.label, scores)
                history["eval_step"].append(step)
                history["auc"].append(auc)
            checkpoints.save(step, state, model=_dense_model(params))
            progress.update(task, advance=1, description=f"loss {ema:.4f}  test AUC {auc:.3f}")
    checkpoints.wait_until_finished()
    if config.steps not in checkpoints.all_steps():
        checkpoints.save(config.steps, state, model=_dense_model(params), force=True)
    checkpoints.close()
    train_seconds = time.perf_counter() - train_started
    console.print(
        f"trained {config.steps} steps in {train_seconds:.1f} s "
        f"({config.steps * batch_size / train_seconds:,.0f} examples/s): loss "
        f"{history['loss'][0]:.4f} -> {history['loss'][-1]:.4f}, test AUC {history['auc'][-1]:.4f} "
        f"(base rate {train.label.mean():.3f})"
    )
    oracle = None
    if eval_log.probability is not None:
        oracle = model.auc(eval_log.label, eval_log.probability)
        console.print(f"the true click probabilities would score a test AUC of {oracle:.4f}")
    console.print(
        f"checkpoints: {out / 'checkpoints'} (steps {checkpoints.all_steps()}; tables and the "
        "tower, which `jaxembed export` serves as a whole)"
    )

    summary = _export_and_compare(config, emb, state, params, test, out, console)
    _plot(out / "training.png", history, shard_counts)
    summary.update(
        dataset=dataset,
        devices=len(devices),
        steps=config.steps,
        batch_size=batch_size,
        first_loss=history["loss"][0],
        last_loss=history["loss"][-1],
        test_auc=history["auc"][-1],
        oracle_auc=oracle,
        base_rate=float(train.label.mean()),
        auc_curve=list(zip(history["eval_step"], history["auc"], strict=True)),
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        shard_counts={k: v.tolist() for k, v in shard_counts.items()},
    )
    _write_atomic(out / "metrics.json", json.dumps(summary, indent=1).encode())
    console.print(f"plot: {out / 'training.png'}")
    console.print(f"metrics: {out / 'metrics.json'}")
    console.print(f"log: {out / 'demo.log'}")
    console.print(f"done in {summary['total_seconds']:.0f} s")
    _write_atomic(out / "demo.log", console.export_text(clear=False).encode())
    return summary


def _export_and_compare(config, emb, state, params, test, out: Path, console: Console) -> dict:
    """Exports the SavedModel, serves a test slice in a TF-only process, compares with JAX."""
    from jaxembed import export
    from jaxembed.export import _serve_worker

    host_params = jax.tree.map(np.asarray, params)
    # out/saved_model/1 is new: a previous run's was refused or deleted by ``run``
    options = export.ExportOptions(version=1, weighted=["categories"])
    started = time.perf_counter()
    path = export.save_serving_model(
        out / "saved_model", emb, state, model.predict, host_params, options=options
    )
    console.print(
        f"SavedModel: {path} (written and verified in {time.perf_counter() - started:.1f} s)"
    )

    sample = test.take(np.arange(min(config.parity_examples, len(test))))
    tables = {t: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    acts = je.embedding_lookup(*model.inputs(sample), tables, emb.feature_config)
    want = np.asarray(model.predict(host_params, acts)["ctr"])
    with tempfile.TemporaryDirectory() as work:
        served = _serve_worker.run(
            {"demo": {"path": path, "inputs": model.serving_request(sample)}}, work
        )["demo"]
    diffs = {loader: float(np.max(np.abs(served[loader]["ctr"] - want))) for loader in served}
    worst = max(diffs.values())
    verdict = "OK" if worst <= 1e-5 else "MISMATCH"
    console.print(
        f"parity: max |TF - JAX| = {worst:.2e} over {len(sample)} test predictions, served by a "
        f"TensorFlow-only process (eager {diffs['eager']:.1e}, TF1 session "
        f"{diffs['session']:.1e}): {verdict}"
    )
    for i in range(min(5, len(sample))):
        console.print(
            f"  example {i}: user {sample.user[i]}, item {sample.item[i]}, label "
            f"{int(sample.label[i])} -> TF {served['eager']['ctr'][i]:.5f}, JAX {want[i]:.5f}"
        )
    return {"saved_model": path, "parity_max_abs_diff": worst, "parity_examples": len(sample)}
