"""Security: remote code only when asked, no pickle-based formats in the source, output names that stay
inside --out whatever the user typed."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import transformers
from hypothesis import given
from hypothesis import strategies as st

import sinkscope
import sinkscope as ss
from helpers import invoke
from sinkscope.errors import InputError
from sinkscope.rundir import NAME_MAX, child, safe_name

SOURCE = Path(sinkscope.__file__).parent
HUB_ID = "sinkscope-test/tiny-llama"

# -- trust_remote_code --------------------------------------------------------------------------------


@pytest.fixture
def remote_code_seen(monkeypatch, model_dir):
    """Every trust_remote_code transformers' loaders receive; the hub id is served from the local dir."""
    seen: list[tuple[str, object]] = []

    def spy(kind, original):
        def from_pretrained(ref, *args, **kwargs):
            seen.append((kind, kwargs.get("trust_remote_code", "not passed")))
            return original(str(model_dir) if ref == HUB_ID else ref, *args, **kwargs)
        return from_pretrained

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        spy("model", transformers.AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        spy("tokenizer", transformers.AutoTokenizer.from_pretrained))
    return seen


@pytest.mark.parametrize("where", ["hub", "local"])
@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_is_trusted_only_when_asked(remote_code_seen, model_dir, where, trust):
    ref = HUB_ID if where == "hub" else str(model_dir)
    lm = ss.load(ref, trust_remote_code=True) if trust else ss.load(ref)
    assert lm.info.source == where
    assert remote_code_seen == [("model", trust), ("tokenizer", trust)]


@pytest.mark.parametrize("flag", [[], ["--trust-remote-code"]])
def test_cli_passes_remote_code_only_with_its_flag(remote_code_seen, model_dir, prompt_file, flag):
    result = invoke("scan", "--model", str(model_dir), "--prompts", str(prompt_file), "--limit", "1", "--quiet",
                    *flag)
    assert result.exit_code == 0, result.output
    assert remote_code_seen == [("model", bool(flag)), ("tokenizer", bool(flag))]


# -- no pickle, no unsafe loads -------------------------------------------------------------------------

PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _import_problems(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS]
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        problems = [f"from {module} import"] if module.split(".")[0] in PICKLERS else []
        if module == "torch" and {a.name for a in node.names} & {"load", "save"}:
            problems.append("from torch import load/save")
        return problems
    return []


def _pickle_names(node: ast.AST) -> list[str]:
    """Any identifier, attribute or keyword mentioning pickle: pd.read_pickle, to_pickle, allow_pickle=..."""
    if isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Attribute):
        name = node.attr
    elif isinstance(node, ast.keyword) and node.arg:
        name = f"{node.arg}="
    else:
        return []
    return [name] if "pickle" in name.lower() else []


def _call_problems(node: ast.AST) -> list[str]:
    if not isinstance(node, ast.Call):
        return []
    func = _dotted(node.func)
    keywords = {k.arg: k.value for k in node.keywords}
    problems = []
    if func in ("torch.load", "torch.serialization.load") and not _is_true(keywords.get("weights_only")):
        problems.append(f"{func} without weights_only=True")
    if func in ("torch.save", "torch.serialization.save"):
        problems.append(f"{func} writes a pickle (use safetensors)")
    if _is_true(keywords.get("trust_remote_code")):
        problems.append("trust_remote_code=True")
    if func.endswith(".from_pretrained") and "trust_remote_code" not in keywords:
        problems.append(f"{func} without an explicit trust_remote_code")
    return problems


def unsafe_constructs(source: str) -> list[str]:
    """What in `source` can run code from a file: pickle and friends, torch.load without weights_only=True,
    torch.save (a pickle), from_pretrained without an explicit trust_remote_code, trust_remote_code=True."""
    return [f"line {getattr(node, 'lineno', '?')}: {problem}" for node in ast.walk(ast.parse(source))
            for check in (_import_problems, _pickle_names, _call_problems) for problem in check(node)]


@pytest.mark.parametrize("snippet", [
    "import pickle", "import cloudpickle as c", "from joblib import load", "pd.read_pickle(path)",
    "frame.to_pickle(path)", "np.load(path, allow_pickle=True)", "torch.load(path)",
    "torch.load(path, weights_only=False)", "from torch import load", "torch.save(state, path)",
    "AutoModel.from_pretrained(ref)", "AutoModel.from_pretrained(ref, trust_remote_code=True)",
])
def test_the_source_check_catches_unsafe_constructs(snippet):
    assert unsafe_constructs(snippet)


@pytest.mark.parametrize("snippet", [
    "torch.load(path, weights_only=True)", "np.load(path)", "AutoModel.from_pretrained(ref, trust_remote_code=flag)",
    "save_file(tensors, path)", '"""no pickle here: safetensors only"""',
])
def test_the_source_check_passes_safe_constructs(snippet):
    assert unsafe_constructs(snippet) == []


def test_source_tree_has_no_pickle_unsafe_load_or_trusted_remote_code():
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 20
    problems = [f"{path.relative_to(SOURCE)} {problem}" for path in files
                for problem in unsafe_constructs(path.read_text(encoding="utf-8"))]
    text_hits = [f"{path.relative_to(SOURCE)}: {literal}" for path in files for literal in
                 ("trust_remote_code=True", "torch.load(") if literal in path.read_text(encoding="utf-8")]
    assert problems == [] and text_hits == []


# -- output names ----------------------------------------------------------------------------------------

HOSTILE = [
    "../", "..", ".", "", "../../x", "replace:../../x", "/etc/passwd", "/", "a\x00b", "\x00", "x" * 1000,
    "ü模型", "é" * 300, "\u202eexe.txt", "\\..\\..\\x", "-rf", ".hidden", "a/b/c", " ", "\n", "replace:\\n",
    "replace:n", "replace:<eos>", "org/model-1.5B", "C:\\Windows", "~/x", "$HOME", "*",
]


def _is_safe_component(name: str) -> bool:
    return (bool(name) and name not in (".", "..") and name.isascii() and len(name) <= NAME_MAX
            and not name.startswith((".", "-")) and all(c.isalnum() or c in "._-" for c in name))


@pytest.mark.parametrize("text", HOSTILE)
def test_safe_name_of_hostile_text_stays_inside_out(tmp_path, text):
    out = tmp_path / "out"
    name = safe_name(text)
    assert _is_safe_component(name), name
    path = child(out, name)
    assert path.parent == out
    path.mkdir(parents=True)  # the file system accepts it
    assert path.resolve().parent == out.resolve()
    assert safe_name(text) == name  # deterministic: a resumed run finds the same directory


def test_safe_names_keep_different_inputs_apart_and_clean_ones_as_they_are():
    names = [safe_name(text) for text in HOSTILE]
    assert len(set(names)) == len(HOSTILE)
    for clean in ("add", "strip", "auto", "p17", "gemma3-270m", "run_1.0"):
        assert safe_name(clean) == clean


@pytest.mark.parametrize("parts", [
    ("../x",), ("a", "..", "..", "x"), ("a/../../x",), ("/etc/passwd",), ("a\x00b",), ("x" * 300,), (".",),
    ("",), ("a", ""), (), ("..",),
])
def test_child_refuses_names_that_leave_out(tmp_path, parts):
    with pytest.raises(InputError):
        child(tmp_path / "out", *parts)


def test_child_refuses_a_symlink_that_points_outside(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "link")
    with pytest.raises(InputError, match="would leave"):
        child(out, "link", "summary.json")


def test_child_accepts_nested_names_inside_out(tmp_path):
    out = tmp_path / "out"
    assert child(out, "bos-add", "summary.json") == out / "bos-add" / "summary.json"
    assert child(out, "a/./b") == out / "a" / "b"
    assert child(str(out), "parts", "part-000001.parquet") == out / "parts" / "part-000001.parquet"


@given(st.text(max_size=300))
def test_any_text_becomes_a_safe_name_inside_out(text):
    name = safe_name(text)
    assert _is_safe_component(name)
    out = Path("/nonexistent-sinkscope-out")
    assert child(out, name).parent == out
