"""The README's API tour runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace = {}  # later blocks build on earlier ones, as a reader would run them
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert "(3, 8) (3, 8) (3, 3, 8)" in capsys.readouterr().out
