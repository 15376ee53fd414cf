"""Portability scan: every notebook's code cells, read as JSON and parsed (never executed), must
run on every device the course supports: a CPU, a Colab T4, a recent GPU.

The rules (a violation names the notebook, the cell, the line and the fix):

1. **No hard-coded device.** Notebooks take ``device = runtime.get_device()`` and use it.
   Outside a guarded region (below) these are violations:

   - a ``.cuda()`` call;
   - a ``torch.cuda.<fn>(...)`` call other than ``is_available`` / ``device_count`` (the rest
     fail where there is no CUDA);
   - a ``"cuda"``, ``"cuda:N"`` or ``"mps"`` string anywhere except in a comparison
     (``device.type == "cuda"`` is a check, not a choice), a dict key or a subscript;
   - a ``"cpu"`` string given as ``device=`` / ``device_type=`` or to ``torch.device(...)`` /
     ``get_device(...)``. Moving results *to* the host (``.cpu()``, ``.to("cpu")``,
     ``map_location="cpu"``) works everywhere and is allowed.

2. **No dtype a T4 lacks.** A T4 (compute capability 7.5) has no native bfloat16 and no FP8:

   - ``torch.bfloat16`` (or ``.bfloat16()``, or the string ``"bfloat16"``) outside a guarded
     region is a violation, except in a comparison (``x.dtype == torch.bfloat16``), as an
     argument of ``torch.finfo``, or as the ``dtype=`` of a call that creates a CPU tensor (no
     ``device=`` other than ``"cpu"``, and not a conversion like ``.to`` or ``autocast``).
   - ``torch.float8_*`` dtypes may appear only in notebooks 20 (FP8) and 24 (GPU tricks), where
     casts are fine on any device; ``torch._scaled_mm`` (the FP8 matmul, compute capability 8.9+)
     must be guarded everywhere.

**Guards.** A region is guarded when an ``if`` or a conditional expression ``a if test else b``
tests one of: ``torch.cuda.is_available()``, ``torch.backends.mps.is_available()``,
``runtime.supports_bf16(...)``, ``kernels.triton_available(...)``,
``torch.cuda.get_device_capability(...)``, ``torch.cuda.is_bf16_supported()``, ``x.is_cuda``, a
comparison with a device string (``device.type == "cuda"``), or a name assigned earlier in the
notebook from such a test (``on_gpu = device.type == "cuda"``). The ``if``'s body and ``else``
are guarded, and so are the operands after a guard in ``a and b`` / ``a or b``; the ``if``'s
own test is not guarded by itself.

**Allow-list.** A line that is right for a reason the rules cannot see ends with
``# portability: ok - <reason>``; a marker without a reason is itself a violation.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

FP8_NOTEBOOKS = {"20", "24"}
_DEVICE_STRING = re.compile(r"^(cuda(:\d+)?|mps)$")
_ALLOW = re.compile(r"#\s*portability:\s*ok\b(?P<reason>.*)$")
_MAGIC = re.compile(r"^(\s*)[%!?]")
# Calls that test where we are, and are safe to call anywhere.
_SAFE_GUARD_CALLS = {
    ("torch", "cuda", "is_available"),
    ("torch", "cuda", "device_count"),
    ("torch", "backends", "mps", "is_available"),
}
_SAFE_GUARD_FUNCS = {"supports_bf16", "triton_available"}
# Calls that also test, but need CUDA themselves: guards, yet flagged when unguarded.
_CUDA_GUARD_CALLS = {
    ("torch", "cuda", "get_device_capability"),
    ("torch", "cuda", "is_bf16_supported"),
}
_CONVERSIONS = {"to", "type", "autocast", "set_default_dtype"}


@dataclass(frozen=True)
class Violation:
    notebook: str
    cell: int
    line: int
    code: str
    problem: str

    def __str__(self) -> str:
        return (
            f"{self.notebook}: cell {self.cell}, line {self.line}: {self.problem}\n    "
            f"{self.code.strip()}"
        )


def _dotted(node: ast.AST) -> tuple[str, ...] | None:
    """('torch', 'cuda', 'is_available') for torch.cuda.is_available; None if not a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return (node.id, *reversed(parts))
    return None


def _call_name(call: ast.Call) -> tuple[str, ...] | None:
    return _dotted(call.func)


def _is_device_string(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and bool(_DEVICE_STRING.match(node.value) or node.value == "cpu")
    )


class _Scanner:
    """Scans one notebook's cells in order; guard names carry from cell to cell."""

    def __init__(self, notebook: str) -> None:
        self.notebook = notebook
        self.number = notebook[:2]
        self.guard_names: set[str] = set()
        self.violations: list[Violation] = []

    # -- guards ------------------------------------------------------------------------------

    def is_guard(self, node: ast.AST) -> bool:
        """Does this expression test which device / features we have?"""
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call):
                name = _call_name(sub)
                if name and (
                    name in _SAFE_GUARD_CALLS
                    or name in _CUDA_GUARD_CALLS
                    or name[-1] in _SAFE_GUARD_FUNCS
                ):
                    return True
            elif isinstance(sub, ast.Compare):
                if any(_is_device_string(x) for x in ast.walk(sub)):
                    return True
            elif isinstance(sub, ast.Attribute) and sub.attr == "is_cuda":
                return True
            elif isinstance(sub, ast.Name) and sub.id in self.guard_names:
                return True
        return False

    def guarded_lines(self, tree: ast.AST) -> set[int]:
        """Lines inside a guarded region (and record names assigned from guards)."""
        lines: set[int] = set()

        def mark(nodes: list[ast.AST]) -> None:
            for n in nodes:
                lines.update(range(n.lineno, (n.end_lineno or n.lineno) + 1))

        for node in ast.walk(tree):
            if isinstance(node, (ast.If, ast.IfExp)) and self.is_guard(node.test):
                body = node.body if isinstance(node.body, list) else [node.body]
                orelse = node.orelse if isinstance(node.orelse, list) else [node.orelse]
                mark(body + orelse)
            elif isinstance(node, ast.BoolOp):
                for i, value in enumerate(node.values[1:], start=1):
                    if any(self.is_guard(v) for v in node.values[:i]):
                        mark([value])
        return lines

    def learn_guard_names(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                if self.is_guard(node.value):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        for n in ast.walk(t):
                            if isinstance(n, ast.Name):
                                self.guard_names.add(n.id)

    # -- the scan ----------------------------------------------------------------------------

    def scan_cell(self, index: int, source: str) -> None:
        lines = source.split("\n")
        # IPython magics and shell escapes are not Python; blank them, keeping line numbers.
        python = "\n".join(
            _MAGIC.sub(r"\1pass  # ", ln) if _MAGIC.match(ln) else ln for ln in lines
        )
        try:
            tree = ast.parse(python)
        except SyntaxError as err:
            self.report(
                index,
                err.lineno or 1,
                lines,
                "the cell is not valid Python, so the portability scan cannot read it",
            )
            return
        allowed: set[int] = set()
        for number, text in enumerate(lines, start=1):
            m = _ALLOW.search(text)
            if m:
                if len(re.sub(r"^[\s\-:—]+", "", m.group("reason")).strip()) < 3:
                    self.report(
                        index,
                        number,
                        lines,
                        "'# portability: ok' needs a reason "
                        "after it: '# portability: ok - why this line is portable'",
                    )
                else:
                    allowed.add(number)
        self.learn_guard_names(tree)  # before the scan: `on_gpu = ...; if on_gpu:` in one cell
        guarded = self.guarded_lines(tree)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            problem = self.problem(node, parents)
            if problem is None:
                continue
            line = node.lineno
            if line in guarded:
                continue
            first, last = _enclosing_statement(node, parents)
            if any(n in allowed for n in range(first, last + 1)):
                continue
            self.report(index, line, lines, problem)

    def problem(self, node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str | None:
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if (
                isinstance(node.func, ast.Attribute)
                and node.func.attr == "cuda"
                and (name is None or name[:-1] != ("torch",))
            ):
                return (
                    ".cuda() hard-codes the GPU; use .to(device) with device = runtime.get_device()"
                )
            if (
                name
                and name[:2] == ("torch", "cuda")
                and len(name) == 3
                and (name not in _SAFE_GUARD_CALLS)
            ):
                return (
                    f"{'.'.join(name)}() fails without CUDA; guard it with "
                    '`if device.type == "cuda":`'
                )
            if name and name[-1] == "_scaled_mm":
                return (
                    "torch._scaled_mm (FP8 matmul) needs compute capability 8.9+; guard it "
                    "with a torch.cuda.get_device_capability() check"
                )
            if (
                name
                and name[-1] == "bfloat16"
                and isinstance(node.func, ast.Attribute)
                and (name != ("torch", "bfloat16"))
            ):
                return (
                    ".bfloat16() converts to a dtype a T4 lacks; guard it with "
                    "runtime.supports_bf16(device)"
                )
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return self.string_problem(node, parents)
        if isinstance(node, ast.Attribute) and _dotted(node) == ("torch", "bfloat16"):
            return self.bf16_problem(node, parents)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id == "torch" and node.attr.startswith("float8"))
        ):
            return self.fp8_problem()
        return None

    def string_problem(self, node: ast.Constant, parents: dict[ast.AST, ast.AST]) -> str | None:
        value = node.value
        parent = parents.get(node)
        if isinstance(parent, ast.JoinedStr) or _in_comparison(node, parents):
            return None
        if value == "bfloat16":
            return self.bf16_problem(node, parents)
        if value.startswith("float8"):
            return self.fp8_problem()
        if _DEVICE_STRING.match(value):
            if isinstance(parent, ast.Dict) and node in parent.keys:
                return None
            if isinstance(parent, ast.Subscript) and parent.slice is node:
                return None
            return (
                f"the device string {value!r} hard-codes a device; use "
                "device = runtime.get_device() (or compare: device.type == ...)"
            )
        if value == "cpu":
            if isinstance(parent, ast.keyword) and parent.arg in ("device", "device_type"):
                return (
                    f'{parent.arg}="cpu" pins this to the CPU while the rest of the '
                    "notebook uses `device`; pass device=device (or allow-list it)"
                )
            if isinstance(parent, ast.Call) and parent.args and parent.args[0] is node:
                name = _call_name(parent)
                if name and name[-1] in ("device", "get_device"):
                    return 'a literal "cpu" device; use runtime.get_device()'
        return None

    def bf16_problem(self, node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str | None:
        if _in_comparison(node, parents):
            return None
        parent = parents.get(node)
        if isinstance(parent, ast.Call):
            name = _call_name(parent)
            if name and name[-1] in ("finfo", "iinfo"):
                return None
        if isinstance(parent, ast.keyword) and parent.arg in ("dtype", "torch_dtype"):
            call = parents.get(parent)
            if isinstance(call, ast.Call) and _creates_cpu_tensor(call):
                return None
        return (
            "bfloat16 is not native on a T4; choose the dtype with "
            "runtime.supports_bf16(device) (e.g. `torch.bfloat16 if "
            "runtime.supports_bf16(device) else torch.float32`)"
        )

    def fp8_problem(self) -> str | None:
        if self.number in FP8_NOTEBOOKS:
            return None
        return (
            "float8 dtypes belong to notebooks 20 and 24 (a T4 has no FP8); use them there, "
            "or allow-list the line with a reason"
        )

    def report(self, cell: int, line: int, lines: list[str], problem: str) -> None:
        code = lines[line - 1] if 0 < line <= len(lines) else ""
        self.violations.append(Violation(self.notebook, cell, line, code, problem))


def _in_comparison(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Is node an operand of a comparison (directly or inside a tuple/list/set operand)?"""
    parent = parents.get(node)
    while isinstance(parent, (ast.Tuple, ast.List, ast.Set)):
        node, parent = parent, parents.get(parent)
    return isinstance(parent, ast.Compare)


def _creates_cpu_tensor(call: ast.Call) -> bool:
    """A call that makes a new tensor on the CPU: not a conversion, no device other than cpu."""
    name = _call_name(call)
    if isinstance(call.func, ast.Attribute) and call.func.attr in _CONVERSIONS:
        return False
    if name and name[-1] in _CONVERSIONS:
        return False
    for kw in call.keywords:
        if kw.arg == "device" and not (
            isinstance(kw.value, ast.Constant) and kw.value.value == "cpu"
        ):
            return False
        if kw.arg is None:  # **kwargs might carry a device
            return False
    return True


def _enclosing_statement(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> tuple[int, int]:
    while not isinstance(node, ast.stmt) and node in parents:
        node = parents[node]
    if isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.FunctionDef, ast.Try)):
        return node.lineno, node.lineno  # a compound statement: its header line only
    return node.lineno, getattr(node, "end_lineno", None) or node.lineno


def scan_notebook(path: Path) -> list[Violation]:
    """Every portability violation in the notebook at ``path`` (an empty list: portable)."""
    nb = nbformat.read(path, as_version=4)
    scanner = _Scanner(path.name)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            scanner.scan_cell(index, cell.source)
    return scanner.violations


def test_there_are_notebooks_to_scan():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_portable(path: Path):
    violations = scan_notebook(path)
    assert not violations, "\n".join(str(v) for v in violations)


# -- the scan itself catches what it should, and only that ------------------------------------


def _write_notebook(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in cells])
    nbformat.write(nb, path)
    return path


BAD_CELLS = {
    0: ("model = model.cuda()", ".cuda()"),
    1: ('x = torch.randn(3, device="cuda")', "'cuda'"),
    2: ('x = torch.zeros(4, device="cpu")', 'device="cpu"'),
    3: ("torch.cuda.synchronize()", "torch.cuda.synchronize() fails without CUDA"),
    4: ("model = model.to(torch.bfloat16)", "bfloat16 is not native"),
    5: ("y = x.bfloat16()", ".bfloat16()"),
    6: ("q = torch.randn(2, device=device, dtype=torch.bfloat16)", "bfloat16 is not native"),
    7: ("w8 = w.to(torch.float8_e4m3fn)", "float8 dtypes belong"),
    8: ('device = torch.device("cuda:0")', "'cuda:0'"),
    9: ('dev = runtime.get_device("cpu")', 'literal "cpu"'),
    10: ('x = x.to("cuda")  # portability: ok', "needs a reason"),
    11: ("if torch.cuda.get_device_capability()[0] >= 8:\n    pass", "get_device_capability"),
    12: ("out = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb)", "_scaled_mm"),
    13: ('with torch.autocast("cuda", dtype=torch.bfloat16):\n    y = f(x)', "'cuda'"),
}

GOOD_CELLS = [
    "from course_utils import runtime\ndevice = runtime.get_device()\n"
    'x = torch.randn(3, device=device).cpu()\nplt.plot(x.to("cpu"))',
    'if device.type == "cuda":\n    torch.cuda.synchronize()\n    y = x.cuda()',
    'on_gpu = device.type == "cuda"',
    "if on_gpu:\n    peak = torch.cuda.max_memory_allocated()",  # a guard name from a cell before
    "dtype = torch.bfloat16 if runtime.supports_bf16(device) else torch.float32\nx = x.to(dtype)",
    "cache = KVCache(1, 4, 2, 8, dtype=torch.bfloat16)  # a CPU tensor, for its byte count",
    "assert x.dtype != torch.bfloat16 and torch.finfo(torch.bfloat16).eps > 0",
    "if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:\n"
    "    y = x.to(device, torch.bfloat16)",
    'state = torch.load(path, map_location="cpu")\ntimings = {"cuda": 1.0, "cpu": 2.0}',
    'x = torch.ones(2, device="cpu")  # portability: ok - the corpus stays on the host',
    '%matplotlib inline\nprint("runs on", device)',
    'g = torch.Generator(device=device).manual_seed(0)\nkind = "cuda" if on_gpu else "cpu"',
    "if kernels.triton_available():\n    y = kernels.rmsnorm_triton(x.cuda(), w.cuda())",
]


def test_scan_catches_a_bad_notebook(tmp_path: Path):
    cells = [src for src, _ in BAD_CELLS.values()]
    path = _write_notebook(tmp_path / "07_bad.ipynb", cells)
    violations = scan_notebook(path)
    by_cell: dict[int, list[Violation]] = {}
    for v in violations:
        by_cell.setdefault(v.cell, []).append(v)
    for cell, (src, expected) in BAD_CELLS.items():
        assert cell in by_cell, f"cell {cell} ({src!r}) was not caught"
        messages = " | ".join(v.problem for v in by_cell[cell])
        assert expected in messages, f"cell {cell}: {messages}"
        assert all(str(v).startswith("07_bad.ipynb: cell ") for v in by_cell[cell])
    assert set(by_cell) == set(BAD_CELLS)


def test_scan_passes_portable_code(tmp_path: Path):
    path = _write_notebook(tmp_path / "07_good.ipynb", GOOD_CELLS)
    violations = scan_notebook(path)
    assert not violations, "\n".join(str(v) for v in violations)


def test_float8_only_in_notebooks_20_and_24(tmp_path: Path):
    src = ["x8 = x.to(torch.float8_e4m3fn)\nprint(torch.finfo(torch.float8_e4m3fn).max)"]
    for name, flagged in (("20_fp8.ipynb", False), ("24_gpu.ipynb", False), ("19_mtp.ipynb", True)):
        violations = scan_notebook(_write_notebook(tmp_path / name, src))
        assert bool(violations) == flagged, (name, [str(v) for v in violations])
    guarded = [
        "if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):"
        "\n    y = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb)"
    ]
    assert not scan_notebook(_write_notebook(tmp_path / "20_ok.ipynb", guarded))


def test_unparsable_cell_is_reported(tmp_path: Path):
    violations = scan_notebook(_write_notebook(tmp_path / "07_broken.ipynb", ["def f(:\n  pass"]))
    assert len(violations) == 1 and "not valid Python" in violations[0].problem


def test_scan_reads_committed_json_without_executing(tmp_path: Path):
    # A cell that would crash (or do harm) if run is only read.
    src = 'raise SystemExit("executed!")\nx = torch.randn(2, device="cuda")'
    path = _write_notebook(tmp_path / "07_noexec.ipynb", [src])
    json.loads(path.read_text())  # plain JSON on disk
    assert [v.line for v in scan_notebook(path)] == [2]


# Notebooks that train a model: each parameters cell offers a GPU scale (runtime.scaled(...,
# gpu=...)), so a Colab GPU trains a visibly better model. Notebook 21 gets its GPU scale from
# pretrain.course_config(), which follows runtime.scale().
TRAINING_NOTEBOOKS = {"01", "05", "07", "08", "09", "18", "19", "20", "22", "23"}


def test_training_notebooks_have_a_gpu_scale():
    missing = []
    for path in NOTEBOOKS:
        if path.name[:2] not in TRAINING_NOTEBOOKS:
            continue
        nb = nbformat.read(path, as_version=4)
        params = [
            c.source
            for c in nb.cells
            if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])
        ]
        if not any(re.search(r"\bgpu=", source) for source in params):
            missing.append(path.name)
    assert not missing, (
        f"parameters cells without a GPU scale (runtime.scaled(..., gpu=...)): {missing}"
    )
    assert {p.name[:2] for p in NOTEBOOKS} >= TRAINING_NOTEBOOKS
