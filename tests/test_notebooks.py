"""The committed notebooks are read by learners on other machines: their outputs must not carry
this machine's absolute paths (stage directories are printed relative to the run directory)."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
MACHINE_PATH = re.compile(r"(?:/root|/home|/work|/tmp|/Users)/[^\s'\"]*|site-packages/")


def text_outputs(notebook: Path):
    """(cell index, text) of every stream and text/* output (images are base64, not text)."""
    for i, cell in enumerate(json.loads(notebook.read_text())["cells"]):
        for out in cell.get("outputs", []):
            if "text" in out:
                yield i, "".join(out["text"])
            for kind, value in out.get("data", {}).items():
                if kind.startswith("text/"):
                    yield i, "".join(value) if isinstance(value, list) else value


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 8


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_have_no_machine_paths(notebook):
    hits = [(i, m) for i, text in text_outputs(notebook) for m in MACHINE_PATH.findall(text)]
    assert not hits, f"{notebook.name}: absolute paths in outputs {hits[:3]}; print paths relative to the run dir"
