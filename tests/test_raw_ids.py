"""Raw ids (``je.Hashing``, ``je.Vocabulary``) against TF's own ops, bit for bit.

TF is the judge throughout: ``tf.strings.to_hash_bucket_fast`` (int64 through
``tf.strings.as_string``) and ``tf.lookup.StaticVocabularyTable``. The rows ``preprocess`` picks
are read back from a lookup of tables whose row ``r`` holds ``r + 1`` (so padding, 0, is told
apart), for dense, ragged and sparse inputs, on one device and on an 8-device mesh; then a model
trained on raw ids is exported and served raw ids by TF alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxembed as je
from jaxembed import _fingerprint

tf = pytest.importorskip("tensorflow")

ADVERSARIAL_STRINGS = ["", "a", "é", "日本語", "🙂🙃", "a\x00b", "x" * 64, "y" * 65, "z" * 1000]
ADVERSARIAL_INTS = [0, 1, -1, 7, 2**63 - 1, -(2**63), 10**18, -(10**18), 2**31, -(2**31) - 1]


def random_strings(rng: np.random.Generator, n: int) -> list[str]:
    alphabet = np.array(list("abcXYZ019 _-é日本🙂"))
    return ["".join(rng.choice(alphabet, size=rng.integers(0, 40))) for _ in range(n)]


def tf_hash(ids, num_bins: int) -> np.ndarray:
    t = tf.constant(ids)
    text = t if t.dtype == tf.string else tf.strings.as_string(t)
    return tf.strings.to_hash_bucket_fast(text, num_bins).numpy()


def tf_text_file(path, key_dtype=tf.string):
    whole, line = tf.lookup.TextFileIndex.WHOLE_LINE, tf.lookup.TextFileIndex.LINE_NUMBER
    return tf.lookup.TextFileInitializer(str(path), key_dtype, whole, tf.int64, line)


def tf_vocabulary(keys, num_oov: int, ids) -> np.ndarray:
    dtype = tf.string if isinstance(keys[0], (str, bytes)) else tf.int64
    table = tf.lookup.StaticVocabularyTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, dtype), tf.range(len(keys), dtype=tf.int64)
        ),
        num_oov,
    )
    return table.lookup(tf.constant(ids, dtype)).numpy()


# -- the hash itself --


def test_fingerprint_every_length_matches_tf():
    rng = np.random.default_rng(0)
    keys = [bytes(rng.integers(1, 256, size=n, dtype=np.uint8)) for n in range(301) for _ in "ab"]
    ours = _fingerprint.hash_buckets(np.array(keys, dtype=np.bytes_), 2**62 + 7)
    np.testing.assert_array_equal(ours.astype(np.int64), tf_hash(keys, 2**62 + 7))


@pytest.mark.parametrize("form", ["str", "bytes", "object-str", "object-bytes"])
def test_hashing_strings_matches_tf(form):
    keys = ADVERSARIAL_STRINGS + random_strings(np.random.default_rng(1), 500)
    encoded = [k.encode() for k in keys]
    ids = {
        "str": np.array(keys),
        "bytes": np.array(encoded, dtype=np.bytes_),
        "object-str": np.array(keys, dtype=object),
        "object-bytes": np.array(encoded, dtype=object),
    }[form]
    for bins in (1, 7, 1000, 2**40 + 3):
        np.testing.assert_array_equal(je.Hashing(bins).lookup(ids), tf_hash(encoded, bins))


def test_hashing_int64_matches_tf():
    rng = np.random.default_rng(2)
    ids = np.concatenate(
        [ADVERSARIAL_INTS, rng.integers(-(2**63), 2**63 - 1, 1000, dtype=np.int64)]
    ).astype(np.int64)
    for bins in (1, 13, 2**20):
        hashing = je.Hashing(bins, key_dtype="int64")
        np.testing.assert_array_equal(hashing.lookup(ids), tf_hash(ids, bins))
        np.testing.assert_array_equal(
            hashing.lookup(ids.astype(np.int32)[:3]), tf_hash(ids[:3], bins)
        )


@pytest.mark.parametrize("kind", ["str", "bytes", "int"])
def test_vocabulary_matches_static_vocabulary_table(kind):
    rng = np.random.default_rng(3)
    if kind == "int":
        keys = list(dict.fromkeys(ADVERSARIAL_INTS + rng.integers(-50, 50, 60).tolist()))
        unknown = rng.integers(-(2**63), 2**63 - 1, 300, dtype=np.int64).tolist()
        ids = np.array(keys + unknown + [51, -51], np.int64)
    else:
        keys = list(dict.fromkeys(ADVERSARIAL_STRINGS + random_strings(rng, 200)))
        unknown = random_strings(np.random.default_rng(4), 300) + ["A", "é ", "日本"]
        ids = np.array(keys + unknown)
        if kind == "bytes":
            keys = [k.encode() for k in keys]
            ids = np.char.encode(ids, "utf-8")
    ids = ids[rng.permutation(len(ids))]
    for oov in (1, 3, 1000):
        vocab = je.Vocabulary(keys, oov)
        assert vocab.num_rows == len(keys) + oov
        np.testing.assert_array_equal(vocab.lookup(ids), tf_vocabulary(keys, oov, ids))


def test_str_ids_find_bytes_keys_and_the_reverse():
    keys = ["é", "b"]
    ids = np.array(["b", "é", "q"])
    want = tf_vocabulary(keys, 2, ids)
    np.testing.assert_array_equal(je.Vocabulary(keys, 2).lookup(np.char.encode(ids)), want)
    np.testing.assert_array_equal(je.Vocabulary([k.encode() for k in keys], 2).lookup(ids), want)


def test_vocabulary_from_file_matches_tf(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes("drama\ncomedy\r\n日本\nIMAX\nSci-Fi\n".encode())
    ids = np.array(["IMAX", "", "drama", "western", "Sci-Fi", "日本", "comedy", "comedy\r"])
    table = tf.lookup.StaticVocabularyTable(tf_text_file(path), num_oov_buckets=2)
    vocab = je.Vocabulary.from_file(path, num_oov_buckets=2)
    assert vocab.num_rows == 5 + 2
    np.testing.assert_array_equal(vocab.lookup(ids), table.lookup(tf.constant(ids)).numpy())
    ints = tmp_path / "ids.txt"
    ints.write_text("10\n-3\n99999999999\n")
    vocab = je.Vocabulary.from_file(ints, key_dtype="int64")
    table = tf.lookup.StaticVocabularyTable(tf_text_file(ints, tf.int64), num_oov_buckets=1)
    ids = np.array([-3, 4, 99999999999, 10], np.int64)
    np.testing.assert_array_equal(vocab.lookup(ids), table.lookup(tf.constant(ids)).numpy())
    empty = tmp_path / "empty-line.txt"
    empty.write_text("a\n\nb\n")
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty line"):
        tf.lookup.StaticVocabularyTable(tf_text_file(empty), num_oov_buckets=1)
    with pytest.raises(ValueError, match="line 2 is empty"):
        je.Vocabulary.from_file(empty)


# -- the rows preprocess picks, every input kind, one device and a mesh --

VOCAB = ["action", "comedy", "", "日本", "Sci-Fi"]


def counting_init(key, shape, dtype=jnp.float32):
    """Row ``r`` holds ``r + 1`` in every column."""
    return jnp.broadcast_to(jnp.arange(1, shape[0] + 1, dtype=dtype)[:, None], shape)


def raw_feature_config():
    vocab = je.Vocabulary(VOCAB, num_oov_buckets=3)
    return {
        "genre_seq": je.FeatureConfig(
            je.TableConfig(vocab.num_rows, 2, counting_init, name="genres"),
            max_sequence_length=6,
            vocabulary=vocab,
        ),
        "user": je.FeatureConfig(
            je.TableConfig(1009, 2, counting_init, name="users"),
            vocabulary=je.Hashing(1009, key_dtype="int64"),
        ),
        "words": je.FeatureConfig(
            je.TableConfig(97, 2, counting_init, name="words"),
            max_sequence_length=5,
            vocabulary=je.Hashing(97),
        ),
        "item": je.FeatureConfig(
            je.TableConfig(6, 2, counting_init, name="items"),
            vocabulary=je.Vocabulary([5, -1, 2**63 - 1], num_oov_buckets=3),
        ),
    }


def raw_inputs(rng: np.random.Generator, batch: int):
    genre_pool = VOCAB + ["western", "ACTION"]
    lengths = rng.integers(0, 5, batch)
    genres = rng.choice(np.array(genre_pool, dtype=object), int(lengths.sum()))
    words = [w.encode() for w in random_strings(rng, 3 * batch)]
    indices = np.stack([np.repeat(np.arange(batch), 3), np.tile(np.arange(3), batch)], 1)
    keep = rng.random(3 * batch) < 0.7
    return {
        "genre_seq": je.Ragged.from_row_lengths(genres, lengths),
        "user": rng.integers(-(2**63), 2**63 - 1, (batch,), dtype=np.int64),
        "words": je.Sparse(indices[keep], np.array(words, dtype=np.bytes_)[keep], (batch, 5)),
        "item": rng.choice(np.array([5, -1, 2**63 - 1, 6, 0, -(2**63)]), (batch, 2)),
    }


def tf_rows(feature: je.FeatureConfig, values) -> np.ndarray:
    vocabulary = feature.vocabulary
    if isinstance(vocabulary, je.Hashing):
        return tf_hash(values, vocabulary.num_bins)
    keys = [k.decode() if isinstance(k, bytes) else k for k in vocabulary.keys]
    values = [v.decode() if isinstance(v, bytes) else v for v in np.asarray(values).tolist()]
    return tf_vocabulary(keys, vocabulary.num_oov_buckets, values)


def check_rows(fc, inputs, acts):
    """Every looked-up position holds ``TF's row + 1``."""
    got = {k: np.asarray(v)[..., 0] - 1 for k, v in acts.items()}
    ragged = inputs["genre_seq"]
    want = tf_rows(fc["genre_seq"], ragged.values)
    for b, (lo, hi) in enumerate(zip(ragged.row_splits[:-1], ragged.row_splits[1:], strict=True)):
        np.testing.assert_array_equal(got["genre_seq"][b, : hi - lo], want[lo:hi])
        assert (got["genre_seq"][b, hi - lo :] == -1).all()  # padding: a zero row
    np.testing.assert_array_equal(got["user"], tf_rows(fc["user"], inputs["user"]))
    np.testing.assert_array_equal(
        got["item"], tf_rows(fc["item"], inputs["item"].reshape(-1)).reshape(got["item"].shape)
    )
    sparse = inputs["words"]
    want = tf_rows(fc["words"], sparse.values)
    np.testing.assert_array_equal(got["words"][tuple(sparse.indices.T)], want)


@pytest.mark.parametrize("devices", [1, 8])
def test_preprocess_picks_tf_rows(devices):
    fc = raw_feature_config()
    mesh = jax.make_mesh((devices,), ("x",), devices=jax.devices()[:devices])
    emb = je.Embedding(fc, je.optimizers.SGD(0.1), mesh=mesh)
    state = emb.init(jax.random.key(0))
    inputs = raw_inputs(np.random.default_rng(devices), batch=16)
    acts = emb.lookup(state, emb.preprocess(inputs))
    check_rows(fc, inputs, acts)
    direct = je.embedding_lookup(inputs, None, emb.embedding_tables(state), fc)
    for k in acts:
        np.testing.assert_array_equal(np.asarray(acts[k]), np.asarray(direct[k]))


def test_training_on_raw_ids_updates_tf_rows():
    fc = raw_feature_config()
    emb = je.Embedding(fc, je.optimizers.SGD(1.0))
    state = emb.init(jax.random.key(0))
    inputs = raw_inputs(np.random.default_rng(5), batch=8)
    batch = emb.preprocess(inputs)
    grads = jax.tree.map(jnp.ones_like, emb.lookup(state, batch))
    new = emb.embedding_tables(emb.apply_gradients(state, batch, grads))
    old = emb.embedding_tables(state)
    table = fc["user"].table
    changed = np.nonzero((np.asarray(new[table]) != np.asarray(old[table])).any(axis=1))[0]
    np.testing.assert_array_equal(changed, np.unique(tf_rows(fc["user"], inputs["user"])))


# -- errors --


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: je.Vocabulary([]), "empty"),
        (lambda: je.Vocabulary(["a", "b", "a"]), "'a'.*twice.*positions 0 and 2"),
        (lambda: je.Vocabulary(["a", 1]), "mix"),
        (lambda: je.Vocabulary([1.5]), "unsupported types"),
        (lambda: je.Vocabulary([True]), "unsupported types"),
        (lambda: je.Vocabulary([2**64]), "outside int64"),
        (lambda: je.Vocabulary(["a\x00"]), "NUL"),
        (lambda: je.Vocabulary("abc"), "list of str"),
        (lambda: je.Vocabulary(["a"], num_oov_buckets=0), "num_oov_buckets.*>= 1"),
        (lambda: je.Hashing(0), "num_bins.*>= 1"),
        (lambda: je.Hashing(10, key_dtype="int32"), "key_dtype"),
    ],
)
def test_bad_vocabularies_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_tf_also_refuses_what_we_refuse():
    with pytest.raises(ValueError, match="num_oov_buckets` must be > 0"):
        tf.lookup.StaticVocabularyTable(
            tf.lookup.KeyValueTensorInitializer(["a"], tf.constant([0], tf.int64)), 0
        )


def test_table_size_must_match_the_vocabulary():
    table = je.TableConfig(10, 4, name="genres")
    with pytest.raises(
        ValueError, match=r"maps ids to 4 rows \(3 keys \+ 1 OOV.*vocabulary_size=10"
    ):
        je.FeatureConfig(table, vocabulary=je.Vocabulary(["a", "b", "c"]), name="genre")
    with pytest.raises(ValueError, match="num_bins=8.*TableConfig\\(vocabulary_size=8"):
        je.FeatureConfig(table, vocabulary=je.Hashing(8))
    with pytest.raises(ValueError, match="vocabulary.*must be None, je.Hashing"):
        je.FeatureConfig(table, vocabulary={"a": 0})


def test_wrong_raw_id_types_name_the_feature():
    fc = raw_feature_config()
    emb = je.Embedding(fc, je.optimizers.SGD(0.1))
    good = raw_inputs(np.random.default_rng(0), batch=4)
    with pytest.raises(TypeError, match="feature 'user'.*string.*key_dtype is 'int64'"):
        emb.preprocess({**good, "user": np.array(["1", "2", "3", "4"])})
    with pytest.raises(TypeError, match="feature 'item'.*float64"):
        emb.preprocess({**good, "item": np.zeros((4, 2))})
    with pytest.raises(TypeError, match=r"Ragged values.*raw ids \(all str or all bytes\)"):
        emb.preprocess(
            {**good, "genre_seq": je.Ragged(np.array(["a", 1], dtype=object), [0, 1, 2, 2, 2])}
        )
    with pytest.raises(ValueError, match="lone surrogate"):
        je.Hashing(3).lookup(np.array(["\ud800"]))


def test_raw_ids_without_a_vocabulary_say_how():
    fc = {"f": je.FeatureConfig(je.TableConfig(4, 2, name="t"))}
    with pytest.raises(TypeError, match="vocabulary"):
        je.embedding_lookup({"f": np.array(["a"])}, None, {fc["f"].table: np.zeros((4, 2))}, fc)


def test_traced_raw_ids_are_refused():
    fc = {"f": je.FeatureConfig(je.TableConfig(5, 2, name="t"), vocabulary=je.Hashing(5, "int64"))}
    tables = {fc["f"].table: jnp.zeros((5, 2))}
    with pytest.raises(TypeError, match="on the host.*preprocess"):
        jax.jit(lambda ids: je.embedding_lookup({"f": ids}, None, tables, fc))(jnp.arange(3))


# -- checkpoints and the served model --


def test_checkpoint_carries_the_vocabularies(tmp_path):
    fc = raw_feature_config()
    emb = je.Embedding(fc, je.optimizers.Adagrad(0.1))
    state = emb.init(jax.random.key(0))
    je.checkpoint.save(tmp_path / "ckpt", emb, state, step=1)
    rebuilt = je.checkpoint.feature_config_from(je.checkpoint.read_config(tmp_path / "ckpt"))
    for path, feature in fc.items():
        assert rebuilt[path].vocabulary == feature.vocabulary
    inputs = raw_inputs(np.random.default_rng(9), batch=4)
    emb2 = je.Embedding(rebuilt)
    restored = je.checkpoint.restore(tmp_path / "ckpt", emb2, tables_only=True)
    for k, v in emb2.lookup(restored, emb2.preprocess(inputs)).items():
        np.testing.assert_array_equal(
            np.asarray(v), np.asarray(emb.lookup(state, emb.preprocess(inputs))[k])
        )
    other = dict(fc)
    table = fc["item"].table
    other["item"] = je.FeatureConfig(table, vocabulary=je.Vocabulary([5, -1, 7], num_oov_buckets=3))
    with pytest.raises(ValueError, match="Feature 'item'.*vocabulary.*rows would mean other ids"):
        je.checkpoint.restore(tmp_path / "ckpt", je.Embedding(other, je.optimizers.Adagrad(0.1)))


def test_served_model_takes_raw_ids_in_a_tf_only_process(tmp_path):
    from jaxembed.export import _saved_model, _serve_worker

    from jaxembed import export

    fc = raw_feature_config()
    emb = je.Embedding(fc, je.optimizers.SGD(0.1))
    state = emb.init(jax.random.key(1))
    path = export.save_serving_model(tmp_path / "model", emb, state)
    signature = tf.saved_model.load(path).signatures["serving_default"]
    specs = signature.structured_input_signature[1]
    assert specs["genre_seq_ids"].dtype == tf.string and specs["words_ids"].dtype == tf.string
    assert specs["user_ids"].dtype == tf.int64 and specs["item_ids"].dtype == tf.int64
    rng = np.random.default_rng(3)
    cases, expected = {}, {}
    for batch in (1, 7):
        samples = _saved_model.sample_inputs(emb, batch, (), rng, min_length=1)
        samples["genre_seq"]["ids"][0] = b"\xe6\x97\xa5\xe6\x9c\xac"  # a key: UTF-8 of 日本
        cases[f"b{batch}"] = {
            "path": path,
            "inputs": _saved_model.serving_request(samples),
            "examples": _saved_model.serialized_examples(samples),
        }
        tables = emb.embedding_tables(state)
        expected[f"b{batch}"] = _saved_model.jax_outputs(emb, tables, samples)
    (tmp_path / "worker").mkdir()
    got = _serve_worker.run(cases, str(tmp_path / "worker"))
    for case, want in expected.items():
        for loader in ("eager", "examples", "session"):
            for name, value in want.items():
                np.testing.assert_array_equal(
                    got[case][loader][name], value, err_msg=f"{case} {loader}"
                )


def test_inspect_shows_the_vocabularies(tmp_path, capsys):
    from jaxembed import cli

    fc = raw_feature_config()
    emb = je.Embedding(fc, je.optimizers.Adagrad(0.1))
    je.checkpoint.save(tmp_path / "ckpt", emb, emb.init(jax.random.key(0)), step=1)
    assert cli.main(["inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "user -> users raw int64 ids hashed into 1,009 rows" in out
    assert "genre_seq -> genres max_sequence_length=6 raw string ids: vocabulary of 5 keys" in out
