"""The project's scripts/ (not a package) as modules, imported the way they import each other."""

import importlib


def load_script(name: str):
    """scripts/NAME.py as a module. scripts/ is on the test path (pyproject.toml), as it is on a
    script's own path when Python runs one, so a script importing a sibling (eval_nano imports
    make_agent_data) gets this same module object."""
    return importlib.import_module(name)
