"""``python -m airlora``: the same command line as ``airlora``."""

from airlora.cli import app

app(prog_name="airlora")
