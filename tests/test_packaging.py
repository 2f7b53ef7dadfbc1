"""`pip install` of the library installs lasp_jax and its needs only; models/, train/ and configs/ stay in the
repository and training needs are an extra."""

import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).parents[1]


def test_wheel_holds_lasp_jax_alone(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lasp_jax", "models", "train", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"lasp_jax"}


def test_library_needs_only_jax_and_numpy():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split("=")[0].split(">")[0].split("[")[0].strip() for dep in project["dependencies"]}
    assert names == {"jax", "jaxlib", "numpy"}
    assert {"train", "test", "cuda"} <= set(project["optional-dependencies"])
