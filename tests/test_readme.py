"""The README's quick example runs as printed and trains."""

import math
import pathlib
import re

import jax

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_quick_example_trains(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "train_step" in b)
    with jax.enable_x64(False):  # the example is float32, as users run it
        namespace = {}
        exec(compile(example, str(README), "exec"), namespace)
    # The loss the README states, within a quarter of it (float32 sums and products differ
    # between CPUs, and GPUs multiply float32 in TF32 by default).
    stated = float(re.search(r"# about (\d+\.\d+)", example).group(1))
    assert stated < math.log(8) - 0.05
    assert abs(float(namespace["value"]) - stated) <= 0.25 * stated
    assert "loss at step 100" in capsys.readouterr().out
