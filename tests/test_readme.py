"""The README's API example runs as written."""

import pathlib
import re


def test_readme_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["o"].shape == (2, 4096, 8, 64)
    assert [g.shape for g in namespace["grads"]] == [(2, 4096, 8, 64), (2, 4096, 2, 64), (2, 4096, 2, 64)]
