"""distsvi never imports pyro: pyro-ppl is a test-only dependency."""

import subprocess
import sys


def test_import_distsvi_does_not_import_pyro():
    code = (
        "import distsvi, distsvi.infer, distsvi.optim, distsvi.poutine, distsvi.distributions, sys; "
        "bad = sorted(m for m in sys.modules if m == 'pyro' or m.startswith('pyro.')); "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_literal_check_from_the_issue():
    result = subprocess.run(
        [sys.executable, "-c", "import distsvi, sys; assert 'pyro' not in sys.modules"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
