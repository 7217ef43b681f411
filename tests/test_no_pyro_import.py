"""distsvi never imports pyro: pyro-ppl is a test-only dependency."""

import subprocess
import sys

CODE = """
import sys
import distsvi
assert 'pyro' not in sys.modules  # the issue's literal check
import distsvi.distributions, distsvi.infer, distsvi.optim, distsvi.poutine
bad = sorted(m for m in sys.modules if m == 'pyro' or m.startswith('pyro.'))
assert not bad, bad
"""


def test_import_distsvi_does_not_import_pyro():
    result = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
