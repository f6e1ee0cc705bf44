"""Import the project's scripts/ (not a package) as modules, once per test session."""

import functools
import importlib.util
import pathlib
import sys

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


@functools.cache
def load_script(name: str):
    """scripts/NAME.py as a module. Registered under its name, so a script importing a sibling
    (eval_nano imports make_agent_data) gets this same module object."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module
