"""The main job, end to end: train a sharded recommender, checkpoint, export, serve, compare.

``jaxembed demo --out DIR`` calls ``run``: a click log (synthetic, or MovieLens), the DLRM-style
model of ``jaxembed.demo.model`` trained on every local device (tables sharded, batch
data-parallel) with jaxembed's Adagrad for the tables and Optax's Adam for the tower, orbax
checkpoints that hold the tower too (a ``DenseModel``: ``jaxembed export DIR/checkpoints OUT``
serves the whole model), a SavedModel for CPU TF Serving, the SavedModel's predictions from a fresh
TensorFlow-only process compared with JAX's, and a PNG of the training curve and of the ids each
shard served. Everything lands in ``DIR``; ``DIR/demo.log`` has the report.

Every phase longer than a moment shows progress (``jaxembed._console``): a live line in a
terminal, a plain line at least every few seconds in a log. ``--resume`` continues training from
the latest checkpoint in ``DIR`` (tables, their Adagrad slots, the tower and its Adam state), on
the same batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import io
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

import jaxembed as je
from jaxembed._console import Reporter, import_tensorflow_quietly
from jaxembed._files import follow_umask
from jaxembed.demo import data, model
from jaxembed.demo.config import (
    INSTALL_HINT,
    LOG_HEADER,
    DemoConfig,
    check_data,
    check_devices,
    check_options,
    check_previous_run,
    check_requirements,
    clear_previous_run,
)

__all__ = ["DemoConfig", "run"]


def _write_atomic(path: Path, data_bytes: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data_bytes)
    follow_umask(tmp)  # mkstemp's 0600 would keep the file from other users
    os.replace(tmp, path)


def _import_optional() -> None:
    """Imports TensorFlow (quietly) and matplotlib now, so a broken install fails before the
    work and not after it."""
    try:
        import_tensorflow_quietly()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError(
            f"jaxembed demo could not import {e.name or 'an optional package'} ({e}); "
            f"{INSTALL_HINT}.",
            name=e.name,
        ) from e


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


def _batches(log: data.ClickLog, batch_size: int, steps: int, seed: int, start: int = 0):
    """Batches ``start + 1 .. steps`` of ``batch_size`` rows, reshuffled every epoch: the ones an
    uninterrupted run from step 1 would see (the first ``start`` are skipped, not cut)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(log))
    position = 0
    for step in range(steps):
        if position + batch_size > len(order):
            order, position = rng.permutation(len(log)), 0
        if step >= start:
            yield log.take(np.sort(order[position : position + batch_size]))
        position += batch_size


def _epoch_starts(examples: int, batch_size: int, steps: int) -> list[int]:
    """The steps after which ``_batches`` starts a new epoch (a new permutation)."""
    per_epoch = examples // batch_size
    return list(range(per_epoch, steps, per_epoch))


def _describe(vocabularies: dict) -> str:
    """How each id space maps to rows, e.g. ``users: hashed into 2,048 rows``."""
    return ", ".join(
        f"{name}: hashed into {v.num_bins:,} rows"
        if isinstance(v, je.Hashing)
        else f"{name}: {len(v.keys):,} keys + {v.num_oov_buckets} out-of-vocabulary row"
        for name, v in vocabularies.items()
    )


def _shard_counts(emb: je.Embedding, batch_log: data.ClickLog) -> dict[str, np.ndarray]:
    """How many ids of ``batch_log`` each device serves, per table."""
    ids = {
        "users": batch_log.user,
        "items": np.concatenate([batch_log.item, batch_log.history.values]),
        "categories": batch_log.categories.values,
    }
    counts = {}
    for name, raw in ids.items():
        layout = emb.plan.layout(name)
        if layout.num_shards > 1:
            rows = batch_log.vocabularies[name].lookup(raw)  # raw ids -> table rows
            counts[name] = layout.shard_loads(name, rows)
    return counts


def _plot(
    path: Path, history: dict, shard_counts: dict[str, np.ndarray], epochs: list[int]
) -> list[str]:
    """Draws the training curve (train loss, test loss, test AUC, epoch and resume markers) and
    the ids each shard served; returns the curve's legend labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_shards) = plt.subplots(1, 2, figsize=(13, 4.8))
    ax_loss.plot(history["step"], history["loss"], color="tab:blue", label="train loss (EMA)")
    ax_loss.plot(
        history["eval_step"],
        history["test_loss"],
        "s--",
        ms=3,
        color="tab:green",
        label="test loss",
    )
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("log loss")
    ax_auc = ax_loss.twinx()
    ax_auc.plot(
        history["eval_step"], history["auc"], "o-", ms=3, color="tab:orange", label="test AUC"
    )
    ax_auc.set_ylabel("test AUC", color="tab:orange")
    for i, step in enumerate(epochs):
        ax_loss.axvline(
            step, color="0.6", lw=0.8, ls=":", label="epoch boundary" if i == 0 else None
        )
    if history.get("resumed_from"):
        ax_loss.axvline(history["resumed_from"], color="tab:red", lw=1, label="resumed here")
    handles = ax_loss.get_legend_handles_labels()
    auc_handles = ax_auc.get_legend_handles_labels()
    labels = handles[1] + auc_handles[1]
    ax_loss.legend(handles[0] + auc_handles[0], labels, fontsize=8)
    ax_loss.set_title("training")
    width = 0.8 / max(1, len(shard_counts))
    for i, (name, counts) in enumerate(shard_counts.items()):
        x = np.arange(len(counts)) + i * width
        ax_shards.bar(x, counts / 1e3, width=width, label=name)
    ax_shards.set_xlabel("device")
    ax_shards.set_ylabel("ids served (thousands)")
    ax_shards.set_title("ids per shard (row-sharded tables, steps trained in this run)")
    if shard_counts:
        ax_shards.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    follow_umask(tmp)
    os.replace(tmp, path)
    return labels


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


def _resume(checkpoints: je.checkpoint.CheckpointManager, opt_state: Any, replicated: Any):
    """The latest checkpoint's step, state, tower params and Adam state (fresh if the step was
    saved without it)."""
    step = checkpoints.latest_step()
    assert step is not None  # check_previous_run found step folders
    has_extra = (Path(checkpoints.directory) / str(step) / "extra").is_dir()
    state, extra = checkpoints.restore(step, extra=opt_state if has_extra else None)
    dense = checkpoints.restore_model(step, sharding=replicated)
    if dense is None:
        raise ValueError(
            f"--resume: step {step} of {checkpoints.directory} holds no tower (it was not "
            "written by jaxembed demo); give the --out of a demo run."
        )
    return step, state, dense.params, extra if has_extra else opt_state


def run(config: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Runs the demo; returns the summary it also writes to ``out/metrics.json``.

    Every option is checked before anything is written (``jaxembed.demo.config``), and so are
    the optional packages the demo needs. An ``out`` that holds a previous run is refused unless
    ``config.overwrite``, which deletes only the previous run's demo outputs, after the checks
    pass, and says so in the log; or ``config.resume``, which continues that run's training
    from its latest checkpoint up to ``config.steps`` and then replaces its export and plot.

    ``console`` is where the report and the progress go (stdout by default): a terminal gets
    live progress lines, anything else a plain line at least every 5 s.

    Raises:
        ValueError, TypeError, FileExistsError, NotADirectoryError, FileNotFoundError: a bad
            option, naming it, the offending value and the fix.
        ModuleNotFoundError: TensorFlow or matplotlib is missing (the ``demo`` extra).
    """
    check_options(config)
    check_requirements()
    previous = check_previous_run(config)
    log = Console(file=io.StringIO(), record=True, soft_wrap=True, width=120)
    report = Reporter(console, log=log)
    out = Path(config.out)
    started = time.perf_counter()
    report.print(f"[bold]{LOG_HEADER}[/bold]: writing to {out}")
    with report.stage("loading TensorFlow and matplotlib"):
        _import_optional()
    devices = jax.devices()
    check_devices(config, len(devices))
    what = "reading MovieLens" if config.movielens else "generating the synthetic click log"
    with report.stage(
        f"{what} ({config.examples:,} impressions)" if not config.movielens else what
    ):
        train, test, dataset = _load(config)
    check_data(config, len(devices), len(train), len(test))
    mesh = jax.make_mesh((len(devices),), ("x",))
    batch_size = config.batch_size
    if previous:
        report.print(clear_previous_run(out, previous))
    # demo.log from the start: it marks ``out`` as the demo's even if this run is interrupted
    _write_atomic(out / "demo.log", log.export_text(clear=False).encode())
    report.print(
        f"{dataset}: {len(train):,} training / {len(test):,} test impressions; raw ids mapped "
        f"to rows by {_describe(train.vocabularies)}"
    )
    report.print(f"{len(devices)} {devices[0].platform.upper()} devices; batch {batch_size}")
    if devices[0].platform == "cpu":
        report.print(je.cpu_kernels_status())

    features = model.feature_config(train.vocabularies, config.dim, config.history_length)
    optimizer = je.optimizers.Adagrad(config.embedding_learning_rate)
    # users and items row-sharded even when small; the plan replicates the categories table
    emb = je.Embedding(features, optimizer, mesh=mesh, sharding={"users": "row", "items": "row"})
    report.print(str(emb.plan), markup=False)
    tx = optax.adam(config.dense_learning_rate)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    eval_log = test.take(
        np.arange(min(config.eval_examples, len(test)) // len(devices) * len(devices))
    )
    checkpoints = je.checkpoint.CheckpointManager(
        out / "checkpoints", emb, max_to_keep=2, save_interval_steps=max(1, config.steps // 2)
    )
    with report.stage("initialising the tables and the tower"):
        state = emb.init(jax.random.key(config.seed))
        eval_batch = emb.preprocess(*model.inputs(eval_log))
        # the tower's init needs only the activations' shapes: one compiled program, no lookup
        shapes = jax.eval_shape(emb.lookup, state, eval_batch)
        acts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        params = jax.jit(model.Tower().init)(jax.random.key(config.seed + 1), acts)
        params = jax.device_put(params, replicated)
        opt_state = jax.device_put(tx.init(params), replicated)
    first_step = 0
    if config.resume:
        with report.stage(f"restoring the latest checkpoint in {out / 'checkpoints'}"):
            first_step, state, params, opt_state = _resume(checkpoints, opt_state, replicated)
        report.print(
            f"--resume: continuing from step {first_step} (tables, Adagrad slots, tower and "
            f"Adam state restored) to step {config.steps}"
        )
    step_fn = _train_step(emb, tx)

    @jax.jit
    def evaluate(state, params, batch):
        return jax.nn.sigmoid(model.Tower().apply(params, emb.lookup(state, batch)))

    history: dict[str, Any] = {"step": [], "loss": [], "eval_step": [], "auc": [], "test_loss": []}
    if config.resume:
        history["resumed_from"] = first_step

    def record_eval(step: int, state, params) -> float:
        scores = np.asarray(evaluate(state, params, eval_batch))
        auc = model.auc(eval_log.label, scores)
        history["eval_step"].append(step)
        history["auc"].append(auc)
        history["test_loss"].append(model.log_loss(eval_log.label, scores))
        return auc

    shard_counts: dict[str, np.ndarray] = {}
    ema: float | None = None

    def take_step(step: int, batch_log: data.ClickLog) -> None:
        nonlocal state, params, opt_state, ema
        batch = emb.preprocess(*model.inputs(batch_log))
        labels = jnp.asarray(batch_log.label)
        state, params, opt_state, loss = step_fn(state, params, opt_state, batch, labels)
        for name, counts in _shard_counts(emb, batch_log).items():
            shard_counts[name] = shard_counts.get(name, 0) + counts
        ema = float(loss) if ema is None else 0.95 * ema + 0.05 * float(loss)
        history["step"].append(step)
        history["loss"].append(ema)
        if step % config.eval_every == 0 or step == config.steps:
            record_eval(step, state, params)
        checkpoints.save(step, state, model=_dense_model(params), extra=opt_state)

    batches = _batches(train, batch_size, config.steps, config.seed, start=first_step)
    train_started = time.perf_counter()
    with report.stage("compiling the evaluation and training steps (XLA)") as stage:
        record_eval(first_step, state, params)  # compiles the evaluation, scores the start
        stage.update(status="evaluation compiled; compiling the training step")
        take_step(first_step + 1, next(batches))  # compiles the training step, and runs it
        jax.block_until_ready(state)
    report.print(
        f"compiled in {stage.elapsed:.1f} s; at step {first_step}: test AUC "
        f"{history['auc'][0]:.4f}, test loss {history['test_loss'][0]:.4f}"
    )
    with report.stage("training", total=config.steps) as stage:
        for step, batch_log in enumerate(batches, first_step + 2):
            take_step(step, batch_log)
            stage.update(
                completed=step,
                status=f"train loss {ema:.4f}, test AUC {history['auc'][-1]:.3f} at step "
                f"{history['eval_step'][-1]}",
            )
    with report.stage("finishing the checkpoint writes"):
        checkpoints.wait_until_finished()
        if config.steps not in checkpoints.all_steps():
            checkpoints.save(
                config.steps, state, model=_dense_model(params), extra=opt_state, force=True
            )
        checkpoints.close()
    train_seconds = time.perf_counter() - train_started
    trained = config.steps - first_step
    report.print(
        f"trained steps {first_step + 1}-{config.steps} in {train_seconds:.1f} s, compiling "
        f"included ({trained * batch_size / train_seconds:,.0f} examples/s): loss "
        f"{history['loss'][0]:.4f} -> {history['loss'][-1]:.4f}, test loss "
        f"{history['test_loss'][0]:.4f} -> {history['test_loss'][-1]:.4f}, test AUC "
        f"{history['auc'][0]:.4f} -> {history['auc'][-1]:.4f} (base rate "
        f"{train.label.mean():.3f})"
    )
    oracle = None
    if eval_log.probability is not None:
        oracle = model.auc(eval_log.label, eval_log.probability)
        report.print(f"the true click probabilities would score a test AUC of {oracle:.4f}")
    report.print(
        f"checkpoints: {out / 'checkpoints'} (steps {checkpoints.all_steps()}; tables and the "
        "tower, which `jaxembed export` serves as a whole; `jaxembed demo --resume --steps N` "
        "continues from the latest)"
    )

    summary = _export_and_compare(config, emb, state, params, test, out, report)
    epochs = _epoch_starts(len(train), batch_size, config.steps)
    with report.stage("drawing the plot"):
        _plot(out / "training.png", history, shard_counts, epochs)
    summary.update(
        dataset=dataset,
        devices=len(devices),
        steps=config.steps,
        resumed_from=first_step if config.resume else None,
        batch_size=batch_size,
        first_loss=history["loss"][0],
        last_loss=history["loss"][-1],
        test_auc=history["auc"][-1],
        test_loss=history["test_loss"][-1],
        oracle_auc=oracle,
        base_rate=float(train.label.mean()),
        auc_curve=list(zip(history["eval_step"], history["auc"], strict=True)),
        test_loss_curve=list(zip(history["eval_step"], history["test_loss"], strict=True)),
        epoch_starts=epochs,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started,
        shard_counts={k: v.tolist() for k, v in shard_counts.items()},
    )
    _write_atomic(out / "metrics.json", json.dumps(summary, indent=1).encode())
    report.print(f"plot: {out / 'training.png'}")
    report.print(f"metrics: {out / 'metrics.json'}")
    report.print(f"log: {out / 'demo.log'}")
    report.print(f"done in {summary['total_seconds']:.0f} s")
    _write_atomic(out / "demo.log", log.export_text(clear=False).encode())
    return summary


def _export_and_compare(config, emb, state, params, test, out: Path, report: Reporter) -> dict:
    """Exports the SavedModel, serves a test slice in a TF-only process, compares with JAX."""
    from jaxembed import export
    from jaxembed.export import _serve_worker

    host_params = jax.tree.map(np.asarray, params)
    # out/saved_model/1 is new (a previous run's was refused or deleted by ``run``), or, to
    # resume, the previous run's SavedModel (checked up front), replaced once the new one passes
    with report.stage("exporting the SavedModel") as stage:

        def progress(description: str, done: int, total: int) -> None:
            stage.update(description=f"exporting: {description}", completed=done, total=total)

        options = export.ExportOptions(
            version=1, weighted=["categories"], overwrite=config.resume, progress=progress
        )
        path = export.save_serving_model(
            out / "saved_model", emb, state, model.predict, host_params, options=options
        )
    report.print(f"SavedModel: {path} (written and verified in {stage.elapsed:.1f} s)")

    sample = test.take(np.arange(min(config.parity_examples, len(test))))
    tables = {t: np.asarray(v) for t, v in emb.embedding_tables(state).items()}
    acts = je.embedding_lookup(*model.inputs(sample), tables, emb.feature_config)
    want = np.asarray(model.predict(host_params, acts)["ctr"])
    with report.stage("serving it from a TensorFlow-only process"):
        with tempfile.TemporaryDirectory() as work:
            served = _serve_worker.run(
                {"demo": {"path": path, "inputs": model.serving_request(sample)}}, work
            )["demo"]
    diffs = {loader: float(np.max(np.abs(served[loader]["ctr"] - want))) for loader in served}
    worst = max(diffs.values())
    verdict = "OK" if worst <= 1e-5 else "MISMATCH"
    report.print(
        f"parity: max |TF - JAX| = {worst:.2e} over {len(sample)} test predictions, served by a "
        f"TensorFlow-only process (eager {diffs['eager']:.1e}, TF1 session "
        f"{diffs['session']:.1e}): {verdict}"
    )
    for i in range(min(5, len(sample))):
        report.print(
            f"  example {i}: user {sample.user[i]}, item {sample.item[i]}, label "
            f"{int(sample.label[i])} -> TF {served['eager']['ctr'][i]:.5f}, JAX {want[i]:.5f}"
        )
    return {"saved_model": path, "parity_max_abs_diff": worst, "parity_examples": len(sample)}
