"""The public API is what docs/api.md shows: every snippet runs as written, in order, as one session;
`kimi_jax.__all__` is exactly the documented names; each has a docstring and type hints."""

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kimi_jax

ROOT = Path(__file__).resolve().parent.parent
API_DOC = ROOT / "docs" / "api.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^## (.+)$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Snippet:
    section: str
    line: int  # where the code starts in docs/api.md
    code: str

    @property
    def id(self) -> str:
        return f"{re.sub(r'[^a-z0-9]+', '_', self.section.lower()).strip('_')}@{self.line}"


def _snippets() -> list[Snippet]:
    text = API_DOC.read_text(encoding="utf-8")
    headings = [(h.start(), h.group(1)) for h in HEADING.finditer(text)]
    out = []
    for fence in FENCE.finditer(text):
        section = next((title for start, title in reversed(headings) if start < fence.start()), "intro")
        out.append(Snippet(section, text.count("\n", 0, fence.start(1)) + 1, fence.group(1)))
    return out


SNIPPETS = _snippets()


@pytest.fixture(scope="module")
def session():
    """Runs the snippets in document order in one namespace, each at most once, up to the one a
    test asks for — so any single snippet can be selected with -k and still sees its predecessors."""
    namespace = {"__name__": "api_doc"}
    done = []

    def run_through(index: int) -> None:
        for snippet in SNIPPETS[len(done):index + 1]:
            exec(compile(snippet.code, f"{API_DOC}:{snippet.line}", "exec"), namespace)  # noqa: S102
            done.append(snippet)

    return run_through


def test_the_doc_has_a_snippet_for_each_part_of_the_api():
    sections = {s.section for s in SNIPPETS}
    assert {"Loading a checkpoint", "Running the model", "The parameters are a pytree",
            "Which experts the router picks", "Devices and meshes", "A model with random weights",
            "Generating", "The agent loop"} <= sections


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[s.id for s in SNIPPETS])
def test_documented_snippet_runs(session, index):
    session(index)


def _documented_names() -> list[str]:
    text = API_DOC.read_text(encoding="utf-8")
    table = text[text.index("## Public names"):]
    return re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)


def test_all_is_exactly_the_documented_names():
    assert sorted(_documented_names()) == kimi_jax.__all__
    assert set(kimi_jax.__all__) <= set(dir(kimi_jax))


def _problems(obj, where: str) -> list[str]:
    """Missing docstring or type hints of one public function, method or class."""
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__") or ""
        generated = doc.startswith(obj.__name__ + "(")  # dataclasses invent a signature as the docstring
        return [] if doc.strip() and not generated else [f"{where}: no docstring"]
    out = [] if (obj.__doc__ or "").strip() or obj.__name__ == "__init__" else [f"{where}: no docstring"]
    signature = inspect.signature(obj)
    for name, p in signature.parameters.items():
        if name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) \
                and p.annotation is p.empty:
            out.append(f"{where}: parameter '{name}' has no type hint")
    if obj.__name__ != "__init__" and signature.return_annotation is signature.empty:
        out.append(f"{where}: no return type")
    return out


def _public_members(cls):
    """(name, function or property) of what a public class defines itself, dunders but __init__/__call__ aside."""
    for name, member in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__call__"):
            continue
        if isinstance(member, (classmethod, staticmethod)):
            member = member.__func__
        if name == "__init__" and dataclasses.is_dataclass(cls):
            continue  # generated from the annotated fields
        if inspect.isfunction(member) or isinstance(member, property):
            yield name, member


def test_every_public_name_has_a_docstring_and_type_hints():
    problems = []
    for name in kimi_jax.__all__:
        obj = getattr(kimi_jax, name)
        if inspect.isclass(obj):
            problems += _problems(obj, name)
            for attr, member in _public_members(obj):
                if isinstance(member, property):
                    problems += [] if member.__doc__ else [f"{name}.{attr}: property without docstring"]
                else:
                    problems += _problems(member, f"{name}.{attr}")
        elif callable(obj):
            problems += _problems(obj, name)
    assert not problems, "\n".join(problems)


def test_importing_the_package_loads_no_jax_until_a_name_is_used():
    code = ("import sys, kimi_jax; assert 'jax' not in sys.modules, 'import kimi_jax imported jax'; "
            "kimi_jax.KimiK2; assert 'jax' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_public_names_never_shadow_submodules():
    from kimi_jax import generate, plan

    assert inspect.ismodule(generate) and inspect.ismodule(plan)
    assert not {p.stem for p in (ROOT / "kimi_jax").iterdir()} & set(kimi_jax.__all__)
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        kimi_jax.load_modle  # noqa: B018


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example uses the bundled model's relative path
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in FENCE.findall(readme) if "import kimi_jax" in b or "import jax, kimi_jax" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], str(ROOT / "README.md"), "exec"), {"__name__": "readme"})  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert "391" in printed[0]  # the agent's answer, through the calculator
    assert len(printed[1].strip("[]").split(",")) == 8  # eight generated token ids
