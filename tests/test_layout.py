"""The code's shape that the architecture promises (docs/ARCHITECTURE.md): one owner of the run directory's names."""

from __future__ import annotations

import json
import re

from conftest import REPO

# As code spells them (string literals); a docstring may name a file for its reader.
RUN_DIRECTORY_NAMES = re.compile(r"[\"'/](?:train_state\.pt|metrics\.jsonl|mixture\.json|data_rank)|checkpoint_\{")
NAMED = re.compile(r'@gin\.configurable\("(\w+)"')  # @gin.configurable("name", ...)
UNNAMED = re.compile(r'@gin\.configurable(?:\((?!")[^)]*\))?[ \t]*(?:#.*)?\n(?:@.*\n)*(?:def|class) (\w+)')


def test_only_checkpoints_spells_the_run_directory():
    spelled = {path.name: sorted(set(RUN_DIRECTORY_NAMES.findall(path.read_text())))
               for path in sorted((REPO / "mtplatform").glob("*.py")) if path.name != "checkpoints.py"}
    assert {name: found for name, found in spelled.items() if found} == {}
    assert RUN_DIRECTORY_NAMES.search((REPO / "mtplatform" / "checkpoints.py").read_text())


def test_importing_the_package_registers_every_configurable():
    """In a fresh process, `import mtplatform` alone (no call, no list) makes gin know every configurable the source
    declares: binding an unknown parameter of each names that configurable's parameter, never "No configurable
    matching". The import itself loads neither torch nor TensorFlow; the first unknown name loads the modules."""
    import subprocess
    import sys

    declared = set()
    for path in (REPO / "mtplatform").glob("*.py"):
        declared |= set(NAMED.findall(path.read_text())) | set(UNNAMED.findall(path.read_text()))
    assert {"train", "experiment", "data_dir", "mixing", "evaluate_checkpoint", "T5Config"} <= declared
    script = f"""
import json, sys
import gin
import mtplatform
light = sorted(m for m in ("tensorflow", "seqio", "torch") if m in sys.modules)
errors = {{}}
for name in {sorted(declared)!r}:
    try:
        gin.parse_config(name + ".no_such_parameter_here = 1")
        errors[name] = "accepted"
    except ValueError as e:
        errors[name] = str(e).splitlines()[0]
    gin.clear_config()
print(json.dumps([light, errors]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    light, errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert light == []
    assert {name: error for name, error in errors.items() if "no_such_parameter_here" not in error} == {}


def test_commands_that_read_no_data_load_neither_tensorflow_nor_seqio(tmp_path, vocab_file):
    """`mtp --help`, `mtp report` and `mtp export` start in a second or two: TensorFlow and seqio (10-20 s) load only
    for commands that read data, and none of the three loads torch (3 s): an export renames the checkpoint's
    weights as numpy arrays. Its directory is the one the in-memory (torch) export writes, byte for byte."""
    import shutil
    import subprocess
    import sys

    import torch

    from mtplatform import checkpoints, huggingface
    from mtplatform import model as model_lib

    shutil.copytree(REPO / "results" / "objectives", tmp_path / "report")
    torch.manual_seed(0)
    model = model_lib.T5(model_lib.T5Config(vocab_size=4096, d_model=32, d_kv=8, d_ff=64, num_layers=3,
                                            num_decoder_layers=2, num_heads=2, shared_blocks=1))
    ckpt = checkpoints.checkpoint_dir(tmp_path / "run", 7)
    ckpt.mkdir(parents=True)
    checkpoints.save_model(model, ckpt / checkpoints.MODEL)
    checkpoints.write_meta(ckpt, 7, 1, None, True)
    script = f"""
import contextlib, io, json, sys
from mtplatform import cli
loaded = {{}}
for name, argv in (("help", ["--help"]), ("report", ["report", {str(tmp_path / "report")!r}]),
                   ("missing", ["export", "--checkpoint={tmp_path / "none"}", "--output={tmp_path / "hf0"}"]),
                   ("export", ["export", "--checkpoint={tmp_path / "run"}", "--output={tmp_path / "hf"}",
                               "--vocab={vocab_file}"])):
    code = None  # --help exits from argparse
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    loaded[name] = [code, sorted(m for m in ("tensorflow", "seqio", "torch") if m in sys.modules)]
print(json.dumps(loaded))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["help"] == [None, []]
    assert loaded["report"] == [0, []]
    rebuilt = (tmp_path / "report" / "results.md").read_text()
    assert rebuilt == (REPO / "results" / "objectives" / "results.md").read_text()
    assert loaded["missing"] == [2, []]  # the missing checkpoint's one-line error
    assert loaded["export"] == [0, []]
    huggingface.export_hf(model, tmp_path / "in_memory")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "in_memory" / name).read_bytes(), name


def test_a_command_ends_without_the_last_garbage_collection(tmp_path):
    """`mtp` freezes the collector's objects after every exit handler the command registered, so the interpreter's
    last collection (2-3 s after a command that loaded TensorFlow and torch) visits none of them: a handler
    registered before the command runs after that freeze and finds them frozen; the command's own result is as
    before (here `mtp report`'s one-line error on a directory that is not an experiment, exit 2)."""
    import subprocess
    import sys

    script = f"""
import atexit, gc, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))
from mtplatform import cli
print("frozen before:", gc.get_freeze_count() > 0, flush=True)
sys.exit(cli.main(["report", {str(tmp_path)!r}]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["frozen before: False", "frozen at exit: True"]
    assert done.stderr.startswith("mtp: error: ") and done.stderr.count("\n") == 1, done.stderr


def test_registering_the_catalogue_loads_no_torch(data_dir):
    """The tasks declare their label sets in `mtplatform.catalog` (seqio, no torch), so the commands that only read
    data (`mtp tasks`, `mtp vocab`, `mtp cache` and its Beam workers) do not pay torch's import: in a fresh process
    the whole catalogue registers, GLUE's and the subsets' labels included, and torch stays unloaded."""
    import subprocess
    import sys

    script = """
import json, sys
from mtplatform import catalog
catalog.import_modules([])
from tasks import subsets
name = subsets.register_subset("glue_rte", 64)
print(json.dumps(["torch" in sys.modules, catalog.LABELS["glue_rte"], catalog.LABELS[name]]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    torch_loaded, rte, subset = json.loads(done.stdout.strip().splitlines()[-1])
    assert not torch_loaded
    assert rte == subset == ["entailment", "not_entailment"]
