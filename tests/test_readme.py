"""The README's API tour runs as written, and its REST request body fits the exported model."""

import json
import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace = {}  # later blocks build on earlier ones, as a reader would run them
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "(3, 8) (3, 8) (3, 3, 8)" in out
    # The README's sample outputs are what its code prints (the sharding plan, the raw ids).
    (plan,) = re.findall(r"```\n(ShardingPlan\(.*?)```", README.read_text(), re.S)
    assert plan.strip() in out
    assert "[2 3]" in out
    _check_rest_request(namespace)


def _check_rest_request(namespace: dict) -> None:
    """The README's TF Serving request, sent to the SavedModel the README exported."""
    tf = pytest.importorskip("tensorflow")
    (body,) = re.findall(r"```json\n(.*?)```", README.read_text(), re.S)
    request = json.loads(body)
    served = tf.saved_model.load(namespace["path"]).signatures[request["signature_name"]]
    _, specs = served.structured_input_signature
    assert sorted(request["inputs"]) == sorted(specs)
    inputs = {k: tf.constant(v, specs[k].dtype) for k, v in request["inputs"].items()}
    ctr = served(**inputs)["ctr"].numpy()
    assert ctr.shape == (2,) and np.all((ctr > 0) & (ctr < 1))
