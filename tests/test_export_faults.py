"""Export under abuse: overwrite targets, signature-key collisions, NaN/Inf, incomplete
tf.Examples, wrong dtypes and NaN in the verification.

Each test is named after the case it covers. The tables are tiny, and one exported SavedModel
(plus one with ``strict_examples``) is shared by the module.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jaxembed.export import _saved_model, _serve_worker  # noqa: E402

import jaxembed as je  # noqa: E402
from jaxembed import cli, export  # noqa: E402

FAST = export.ExportOptions(verify=False)


def _emb() -> je.Embedding:
    items = je.TableConfig(10, 4, combiner="sum", name="items")
    users = je.TableConfig(12, 3, combiner="mean", name="users")
    features = {"item": je.FeatureConfig(items), "user": je.FeatureConfig(users)}
    return je.Embedding(features)


@pytest.fixture(scope="module")
def trained():
    emb = _emb()
    return emb, emb.init(jax.random.key(0))


@pytest.fixture(scope="module")
def saved_model(trained, tmp_path_factory):
    """A verified SavedModel of ``trained``, copied by tests that need one at their target."""
    emb, state = trained
    return Path(export.save_serving_model(tmp_path_factory.mktemp("sm") / "m", emb, state))


@pytest.fixture(scope="module")
def strict_model(trained, tmp_path_factory):
    emb, state = trained
    options = export.ExportOptions(strict_examples=True)
    return Path(
        export.save_serving_model(
            tmp_path_factory.mktemp("strict") / "m", emb, state, options=options
        )
    )


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    """A jaxembed checkpoint directory with steps 0 and 5."""
    emb, state = trained
    directory = tmp_path_factory.mktemp("ckpt") / "ckpt"
    for step in (0, 5):
        je.checkpoint.save(directory, emb, state, step)
    return directory


@pytest.fixture
def no_export_work(monkeypatch):
    """Refusals must come before any export work: building the serving module fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the export started before the target was checked")

    monkeypatch.setattr(_saved_model, "_ServingModule", forbidden)


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _overwrite(target, emb, state, **kw):
    options = export.ExportOptions(overwrite=True, verify=False)
    return export.save_serving_model(target, emb, state, options=options, **kw)


# -- 1. overwrite safety --


def test_overwrite_refuses_checkpoint_directory(trained, checkpoint, no_export_work):
    emb, state = trained
    before = _snapshot(checkpoint)
    with pytest.raises(FileExistsError, match=r"jaxembed checkpoint \(steps 0, 5\)"):
        _overwrite(checkpoint, emb, state)
    assert _snapshot(checkpoint) == before


def test_overwrite_refuses_the_source_checkpoint(trained, checkpoint, tmp_path, capsys):
    """``jaxembed export CKPT CKPT --overwrite`` used to exit 0 after deleting the checkpoint."""
    emb, state = trained
    before = _snapshot(checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(checkpoint), str(checkpoint), "--overwrite"])
    assert exit_info.value.code != 0
    assert "checkpoint" in capsys.readouterr().err
    assert _snapshot(checkpoint) == before
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        _overwrite(checkpoint, emb, state, source_checkpoint=checkpoint)
    link = tmp_path / "link"  # the same checkpoint under another name
    link.symlink_to(checkpoint)
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        _overwrite(link, emb, state, source_checkpoint=checkpoint)
    empty = tmp_path / "empty"  # replaceable itself, but it contains the source
    empty.mkdir()
    with pytest.raises(ValueError, match="contains the checkpoint being exported"):
        _overwrite(empty, emb, state, source_checkpoint=empty / "ckpt")
    assert _snapshot(checkpoint) == before


def test_overwrite_refuses_target_inside_checkpoint(trained, checkpoint, no_export_work):
    """``--version 1`` on the checkpoint directory would write a "step" 1 into it."""
    emb, state = trained
    before = _snapshot(checkpoint)
    options = export.ExportOptions(version=1, overwrite=True)
    with pytest.raises(ValueError, match=r"inside the jaxembed checkpoint .*steps 0, 5"):
        export.save_serving_model(checkpoint, emb, state, options=options)
    with pytest.raises(ValueError, match="inside the checkpoint being exported"):
        _overwrite(checkpoint / "serving", emb, state, source_checkpoint=checkpoint)
    assert _snapshot(checkpoint) == before


def test_overwrite_refuses_folder_of_user_files(trained, tmp_path, no_export_work):
    emb, state = trained
    target = tmp_path / "out"
    (target / "data").mkdir(parents=True)
    (target / "a.txt").write_text("mine")
    (target / "b.txt").write_text("mine too")
    (target / "data" / "c.csv").write_text("1,2")
    before = _snapshot(target)
    with pytest.raises(
        FileExistsError,
        match=r"3 files or directories that are not part of a SavedModel: a\.txt, b\.txt, data/",
    ):
        _overwrite(target, emb, state)
    assert _snapshot(target) == before


def test_overwrite_refuses_savedmodel_with_user_files(
    trained, saved_model, tmp_path, no_export_work
):
    emb, state = trained
    target = tmp_path / "m"
    shutil.copytree(saved_model, target)
    (target / "notes.txt").write_text("mine")
    before = _snapshot(target)
    with pytest.raises(FileExistsError, match=r"a SavedModel plus 1 .*: notes\.txt"):
        _overwrite(target, emb, state)
    assert _snapshot(target) == before


def test_overwrite_refuses_regular_file(trained, tmp_path, no_export_work):
    emb, state = trained
    target = tmp_path / "model"
    target.write_text("not a model")
    with pytest.raises(FileExistsError, match="holds a file"):
        _overwrite(target, emb, state)
    assert target.read_text() == "not a model"


def test_overwrite_refuses_serving_base_directory(trained, saved_model, tmp_path, no_export_work):
    emb, state = trained
    shutil.copytree(saved_model, tmp_path / "base" / "1")
    with pytest.raises(FileExistsError, match=r"TF Serving base directory \(versions 1\)"):
        _overwrite(tmp_path / "base", emb, state)
    assert (tmp_path / "base" / "1" / "saved_model.pb").is_file()


def test_existing_target_without_overwrite_says_pass_overwrite(trained, tmp_path):
    emb, state = trained
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError, match=r"empty directory.*overwrite=True"):
        export.save_serving_model(tmp_path / "empty", emb, state, options=FAST)


def test_overwrite_replaces_savedmodel_and_empty_directory(trained, saved_model, tmp_path):
    emb, state = trained
    other = emb.init(jax.random.key(1))
    target = tmp_path / "m"
    shutil.copytree(saved_model, target)
    _overwrite(target, emb, other)
    served = tf.saved_model.load(str(target)).signatures["serving_default"]
    out = served(
        item_ids=tf.constant([3], tf.int64),
        item_lengths=tf.constant([1], tf.int64),
        user_ids=tf.constant([0], tf.int64),
        user_lengths=tf.constant([1], tf.int64),
    )
    np.testing.assert_array_equal(out["item"].numpy()[0], np.asarray(other.tables["items"])[3])
    (tmp_path / "empty").mkdir()
    _overwrite(tmp_path / "empty", emb, state)
    assert (tmp_path / "empty" / "saved_model.pb").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m"]  # nothing left over


def test_overwrite_keeps_old_model_when_verification_fails(
    trained, saved_model, tmp_path, monkeypatch
):
    emb, state = trained
    target = tmp_path / "m"
    shutil.copytree(saved_model, target)
    before = _snapshot(target)
    real = _saved_model.jax_outputs
    monkeypatch.setattr(
        _saved_model,
        "jax_outputs",
        lambda *a, **k: {n: v + 1 for n, v in real(*a, **k).items()},
    )
    options = export.ExportOptions(overwrite=True)
    with pytest.raises(export.ExportVerificationError):
        export.save_serving_model(target, emb, state, options=options)
    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_overwrite_keeps_old_model_when_swap_fails(trained, saved_model, tmp_path, monkeypatch):
    emb, state = trained
    target = tmp_path / "m"
    shutil.copytree(saved_model, target)
    before = _snapshot(target)
    real = os.replace

    def failing(src, dst):
        if ".tmp-" in str(src):  # the new model's rename into place
            raise OSError("disk on fire")
        real(src, dst)

    monkeypatch.setattr(_saved_model.os, "replace", failing)
    with pytest.raises(OSError, match="disk on fire"):
        _overwrite(target, emb, state)
    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# -- 2. two names for one signature key --


def test_output_key_collision_names_both(trained, tmp_path):
    emb, state = trained

    def model(params, acts):
        return {"a/b": acts["item"], "a_b": acts["item"] * 2}

    with pytest.raises(
        ValueError, match=r"utput 'a/b' and output 'a_b' both map to the signature output 'a_b'"
    ):
        export.save_serving_model(tmp_path / "m", emb, state, model, {}, options=FAST)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "paths, weighted, match",
    [
        (
            ("ctx/item", "ctx_item"),
            (),
            r"'ctx/item' and feature 'ctx_item' .* input 'ctx_item_ids'",
        ),
        (("Item", "item"), (), r"'Item' and feature 'item' .* input 'Item_ids' .*ignore case"),
        (
            ("a", "a_weights"),
            ("a",),
            r"weights of feature 'a' .*tf\.Example feature key 'a_weights'",
        ),
    ],
)
def test_feature_path_collision_names_both(tmp_path, paths, weighted, match):
    table = je.TableConfig(10, 4, name="t")
    features: dict = {}
    for path in paths:
        head, _, tail = path.partition("/")
        if tail:
            features.setdefault(head, {})[tail] = je.FeatureConfig(table)
        else:
            features[head] = je.FeatureConfig(table)
    emb = je.Embedding(features)
    state = emb.init(jax.random.key(0))
    options = export.ExportOptions(weighted=weighted, verify=False)
    with pytest.raises(ValueError, match=match):
        export.save_serving_model(tmp_path / "m", emb, state, options=options)


# -- 3. NaN/Inf in tables and parameters --


def _with_rows(emb, state, table: str, rows: dict[int, float]):
    tables = {
        emb.table_names[t]: np.asarray(v).copy() for t, v in emb.embedding_tables(state).items()
    }
    for row, value in rows.items():
        tables[table][row, row % tables[table].shape[1]] = value
    return emb.state_from_logical(tables)


def test_non_finite_table_is_refused(trained, tmp_path):
    emb, state = trained
    bad = _with_rows(emb, state, "users", {2: np.nan, 7: np.inf, 9: -np.inf})
    with pytest.raises(ValueError, match=r"Table 'users' .* 3 of its 12 rows \(rows 2, 7, 9\)"):
        export.save_serving_model(tmp_path / "m", emb, bad)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_model_params_are_refused(trained, tmp_path):
    emb, state = trained
    params = {"dense": {"w": jnp.array([[1.0, np.nan], [0.0, 1.0]]), "n": jnp.array(3)}}

    def model(params, acts):
        return acts["user"][:, :2] @ params["dense"]["w"]

    with pytest.raises(ValueError, match=r"parameter 'dense/w' holds 1 NaN or Inf .*\(0, 1\)"):
        export.save_serving_model(tmp_path / "m", emb, state, model, params)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_table_allowed_with_option(trained, tmp_path):
    """Case 6 too: the verification compares NaN with NaN as equal (it used to report a
    mismatch, max abs diff nan)."""
    emb, state = trained
    bad = _with_rows(emb, state, "items", {row: np.nan for row in range(10)})
    options = export.ExportOptions(allow_non_finite=True, sample_batch_sizes=(6,))
    path = export.save_serving_model(tmp_path / "m", emb, bad, options=options)  # verified
    served = tf.saved_model.load(path).signatures["serving_default"]
    out = served(
        item_ids=tf.constant([4], tf.int64),
        item_lengths=tf.constant([1], tf.int64),
        user_ids=tf.constant([4], tf.int64),
        user_lengths=tf.constant([1], tf.int64),
    )
    assert np.isnan(out["item"].numpy()).any()


def test_export_options_flags_are_validated():
    with pytest.raises(TypeError, match="allow_non_finite must be True or False"):
        export.ExportOptions(allow_non_finite="yes")
    with pytest.raises(TypeError, match="strict_examples must be True or False"):
        export.ExportOptions(strict_examples=1)


# -- 4. tf.Examples that lack a feature --


def _example(**features) -> bytes:
    feature = {
        k: tf.train.Feature(int64_list=tf.train.Int64List(value=v)) for k, v in features.items()
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _request() -> dict[str, np.ndarray]:
    one = np.array([1], np.int64)
    return {"item_ids": one, "item_lengths": one, "user_ids": one, "user_lengths": one}


def test_missing_example_feature_is_served_as_zeros(trained, saved_model, strict_model, tmp_path):
    """The default (TF's parser reads an absent feature as empty); strict mode serves complete
    examples as usual. Served by a TF-only process."""
    emb, state = trained
    examples = [_example(item=[3], user=[5]), _example(item=[3])]
    cases = {
        "default": {"path": saved_model, "inputs": _request(), "examples": examples},
        "strict": {"path": strict_model, "inputs": _request(), "examples": examples[:1]},
    }
    got = _serve_worker.run(cases, str(tmp_path))
    users = got["default"]["examples"]["user"]
    np.testing.assert_array_equal(users[1], np.zeros(3, np.float32))
    np.testing.assert_array_equal(users[0], np.asarray(state.tables["users"])[5])
    np.testing.assert_array_equal(got["strict"]["examples"]["user"], users[:1])


def test_strict_examples_rejects_missing_feature(strict_model):
    """Reloaded by TF alone; an absent feature and an empty one are both rejected (TF's parser
    cannot tell them apart)."""
    served = tf.saved_model.load(str(strict_model)).signatures["serving_examples"]
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"feature user: a tf\.Example lacks it.*\[1\]"
    ):
        served(examples=tf.constant([_example(item=[3], user=[5]), _example(item=[3])]))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"feature user: a tf\.Example lacks it"
    ):
        served(examples=tf.constant([_example(item=[3], user=[])]))


# -- 5. wrong dtypes --


def test_wrong_dtype_names_the_input(saved_model, tmp_path):
    """The project's serving path (the TF-only worker) names the input; TF's own signature call
    with tensors of the wrong dtype raises too, but names only the input's position."""
    request = dict(_request(), user_ids=np.array([1], np.int32))
    cases = {"c": {"path": saved_model, "inputs": request}}
    with pytest.raises(
        TypeError, match=r"input 'user_ids' is int32, but the signature takes int64"
    ):
        _serve_worker.run(cases, str(tmp_path))
    served = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    tensors = {k: tf.constant(v) for k, v in request.items()}
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match="int32"):
        served(**tensors)


# -- 6. NaN in the verification --


def test_verification_reports_nan_position(trained, tmp_path, monkeypatch):
    emb, state = trained
    real = _saved_model.jax_outputs

    def nan_in_jax(*args, **kwargs):
        out = real(*args, **kwargs)
        out["item"] = out["item"].copy()
        out["item"][0, 1] = np.nan
        return out

    monkeypatch.setattr(_saved_model, "jax_outputs", nan_in_jax)
    with pytest.raises(export.ExportVerificationError, match=r"'item' is NaN at \(0, 1\) in JAX"):
        export.save_serving_model(tmp_path / "m", emb, state)
    assert list(tmp_path.iterdir()) == []


def test_save_tf_checkpoint_refuses_existing_files(trained, tmp_path):
    """TF's writer would silently replace PREFIX.index / PREFIX.data-*; refuse instead."""
    emb, state = trained
    prefix = tmp_path / "ckpt"
    (tmp_path / "ckpt.index").write_bytes(b"a user's file")
    with pytest.raises(FileExistsError, match=r"ckpt\.index already exist"):
        export.save_tf_checkpoint(prefix, emb, state)
    assert (tmp_path / "ckpt.index").read_bytes() == b"a user's file"
    path = export.save_tf_checkpoint(tmp_path / "fresh", emb, state)
    with pytest.raises(FileExistsError, match="Choose a new prefix"):
        export.save_tf_checkpoint(tmp_path / "fresh", emb, state)
    assert os.path.exists(path + ".index")
