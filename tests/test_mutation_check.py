"""scripts/mutation_check.py's own contract (the mutations themselves run in CI, .ci/run): every
target is found exactly once, a moved or rewritten target stops the check loudly, and a
mutation changes the source."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mc():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_target_is_found_once_and_every_mutation_changes_it(mc):
    assert len(mc.MUTATIONS) >= 15
    assert len({m.name for m in mc.MUTATIONS}) == len(mc.MUTATIONS)
    for m in mc.MUTATIONS:
        path = mc.find_target(ROOT, m)
        assert path.read_text().count(m.old) == 1 and m.new != m.old, m.name
        named = [t.split("::")[0] for t in m.tests if t.startswith("tests/")]
        assert named and all((ROOT / t).is_file() for t in named), m.name


def test_a_missing_or_ambiguous_target_stops_the_check(mc):
    gone = mc.Mutation("gone", "nothing", "this text is in no module of mecref", "x", ("tests/test_quant.py",))
    with pytest.raises(SystemExit, match="mutation target not found"):
        mc.find_target(ROOT, gone)
    twice = mc.Mutation("twice", "nothing", "import numpy as np", "x", ("tests/test_quant.py",))
    with pytest.raises(SystemExit, match="ambiguous"):
        mc.find_target(ROOT, twice)


def test_list_and_only_on_the_command_line():
    script = str(ROOT / "scripts" / "mutation_check.py")
    out = subprocess.run([sys.executable, script, "--list", "--only", "nesterov"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("nesterov") and "mecref/optim.py" in out.stdout
    bad = subprocess.run([sys.executable, script, "--only", "no-such-mutation"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown mutation" in bad.stderr
