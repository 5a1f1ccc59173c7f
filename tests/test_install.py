"""The install is reproducible: one known version of each module, pip check clean."""

import importlib.metadata as md
import subprocess
import sys


def test_pinned_versions():
    import seqio
    import tensorflow_datasets
    import torch

    assert seqio.__version__ == "0.0.20"
    assert tensorflow_datasets.__version__ == "4.9.10"
    assert torch.__version__.startswith("2.13.0")
    assert md.version("t5") == "0.9.4"


def test_nightly_aliases_write_no_module():
    # t5 requires seqio-nightly and tfds-nightly; ours are empty aliases, so the stable releases own the modules.
    for alias, module in (("seqio-nightly", "seqio/"), ("tfds-nightly", "tensorflow_datasets/")):
        files = [str(f) for f in (md.files(alias) or [])]
        assert not [f for f in files if f.startswith(module)], f"{alias} writes {module}"
    seqio_files = [str(f) for f in md.files("seqio") if str(f).startswith("seqio/")]
    assert seqio_files


def test_pip_check_clean():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_file_with_slow_tests_is_in_the_slow_step():
    """scripts/test.sh runs slow tests file by file: a file with slow tests that its slow step does not name would
    never run in CI."""
    import re

    from conftest import REPO

    script = (REPO / "scripts" / "test.sh").read_text()
    named = set(re.findall(r"tests/(test_\w+\.py)", script[script.index("-m slow"):]))
    marked = {path.name for path in (REPO / "tests").glob("test_*.py")
              if re.search(r"^@pytest\.mark\.slow", path.read_text(), flags=re.M)}
    assert marked and marked - named == set()
