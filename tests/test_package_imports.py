"""The installed package stands apart from the study: every module imports on its own (no import cycles, no
order dependence) and importing any of them never imports ``study``, which is not a packaged folder."""

import fnmatch
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a child process from the repository root (where `study` is importable, so that an import of it would
# succeed and be seen): before each module, every prune_trainer / study module is dropped from sys.modules.
# Third-party modules stay loaded, so that the whole walk costs one torch / transformers import.
CHECK = """
import importlib, json, pkgutil, sys, traceback
import prune_trainer
walk = pkgutil.walk_packages(prune_trainer.__path__, "prune_trainer.")
names = sorted(m.name for m in walk if not m.name.endswith(".__main__"))  # __main__ runs the CLI
report = {"modules": names, "failed": {}, "study": {}}
for name in ["prune_trainer", *names]:
    for key in [k for k in sys.modules if k.split(".")[0] in ("prune_trainer", "study")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception:
        report["failed"][name] = traceback.format_exc(limit=3)
    leaked = sorted(k for k in sys.modules if k.split(".")[0] == "study")
    if leaked:
        report["study"][name] = leaked
print(json.dumps(report))
"""


def test_every_module_imports_alone_and_never_imports_study():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "prune_trainer.factorization" in report["modules"]
    assert len(report["modules"]) > 30  # the walk found the whole package
    assert report["failed"] == {}
    assert report["study"] == {}


def test_study_is_not_packaged_and_the_moved_modules_are_gone():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:  # (tomllib is 3.11+; the project supports 3.10)
        section = f.read().split("[tool.setuptools.packages.find]")[1].split("\n[")[0]
    include = json.loads(re.search(r"^include\s*=\s*(\[.*\])$", section, re.M).group(1))
    assert include == ["prune_trainer*"]
    assert not any(fnmatch.fnmatchcase(name, pattern) for pattern in include for name in ("study", "study.report"))
    for moved in ("recipes/reproduce.py", "oneshot/experiments.py", "reporting/report.py",
                  "oneshot/embedding_factorization.py"):
        assert not os.path.exists(os.path.join(ROOT, "prune_trainer", moved)), moved
    from prune_trainer.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # the study's commands left the library's CLI
    assert "run" in commands and "reproduce" not in commands and "report" not in commands
