"""Issue 11: what a new operator hits in the first hour -- each must fail loudly and at once.

Against real processes: a secured mosquitto written by ``moe2 broker-config``, ``moe2 ask``,
agents and coordinators started as an operator would start them.
"""

from __future__ import annotations

import re
from pathlib import Path

#: a hung command is a failed test; the commands here must answer at once
COMMAND_TIMEOUT_S = 60.0


def test_readme_names_files_that_exist_and_prompts_the_demo_answers() -> None:
    """The README's phone example asks what the demo fleet answers, in its form, and every
    repository file it names exists (issue 11.6)."""
    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    assert "What is 2 plus 3?" not in readme  # the toy experts answered "4"
    assert '"prompt": "Q: Which city is the capital of Peru? A:", "raw": True' in readme
    assert "Peru" in (repo / "tools" / "offline" / "corpus.py").read_text()
    named = set(re.findall(r"`((?:agent|coordinator|shared|cli|tools|gateway|scripts|systemd|"
                           r"dashboards|tests)/[\w./@-]+)`", readme))
    assert named, "the README names no repository files?"
    missing = sorted(p for p in named if not (repo / p).exists())
    assert not missing, f"the README names files that do not exist: {missing}"
    assert "joint=[...]" in readme  # the monitor's joint plan is explained
