"""The resume snippet: the few lines that make a training script resumable, found by reading its AST.

`propose(source)` detects the framework (a Hugging Face `Trainer`, a Lightning `Trainer` with `.fit`, or a
plain PyTorch loop `for step in range(...)` with `optimizer.step()`) and returns the script with the lines
added, and their unified diff. Only those lines change: the edits are made in the text, at the positions the
AST gives, so the rest of the script keeps its formatting and comments. `propose` is pure; `script_of`,
`proposal_for` and `write` find, read and rewrite the script on disk (`vl init` and `vl run` ask first).
"""

from __future__ import annotations

import ast
import difflib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

HF, LIGHTNING, PYTORCH = "Hugging Face Trainer", "Lightning", "plain PyTorch loop"
_HF_MODULES = {"transformers", "trl"}
_LIGHTNING_MODULES = {"lightning", "pytorch_lightning"}
_INTERPRETER_OPTIONS_WITH_VALUE = {"-W", "-X", "-Q"}


class NotApplicable(ValueError):
    """No snippet can be proposed; the message says why on one line."""


@dataclass(frozen=True)
class Proposal:
    framework: str
    source: str
    diff: str


@dataclass(frozen=True)
class _Edit:
    start: int  # character offsets into the source
    end: int
    text: str


class _Source:
    """The script's text, addressed the way the AST addresses it (1-based lines, UTF-8 byte columns)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.line_starts = [0]
        for line in self.lines:
            self.line_starts.append(self.line_starts[-1] + len(line))

    def offset(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1] if lineno <= len(self.lines) else ""
        return self.line_starts[lineno - 1] + len(line.encode()[:col].decode(errors="ignore"))

    def start(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)

    def segment(self, node: ast.AST) -> str:
        return self.text[self.start(node):self.end(node)]

    def indent(self, node: ast.stmt) -> str:
        line = self.lines[node.lineno - 1]
        return line[: len(line) - len(line.lstrip())]

    def line_before(self, node: ast.stmt, text: str) -> _Edit:
        """A new line `text` just above the statement, at its indentation."""
        at = self.line_starts[node.lineno - 1]
        return _Edit(at, at, f"{self.indent(node)}{text}\n")

    def line_after(self, node: ast.stmt, indent: str, text: str) -> _Edit:
        at = self.line_starts[node.end_lineno] if node.end_lineno < len(self.lines) else len(self.text)
        newline = "" if self.text[:at].endswith("\n") else "\n"
        return _Edit(at, at, f"{newline}{indent}{text}\n")

    def apply(self, edits: list[_Edit]) -> str:
        text = self.text
        # From the end backwards, so offsets stay valid; edits at one place keep the order they were given in.
        for _, edit in sorted(enumerate(edits), key=lambda item: (item[1].start, item[1].end, item[0]), reverse=True):
            text = text[:edit.start] + edit.text + text[edit.end:]
        return text


def propose(source: str, name: str = "train.py") -> Proposal:
    """The script with the lines that make it resume through VaultLayer, or NotApplicable saying why."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise NotApplicable(f"{name} does not parse: {err.msg} (line {err.lineno})") from None
    modules = _imported_modules(tree)
    if "vaultlayer" in modules:
        raise NotApplicable(f"{name} already saves through VaultLayer")
    text = _Source(source)
    if modules & _LIGHTNING_MODULES and (call := _trainer_call(tree, exact=True)):
        framework, edits = LIGHTNING, _lightning_edits(tree, text, call, name)
    elif modules & _HF_MODULES and (call := _trainer_call(tree, exact=False)):
        framework, edits = HF, _hf_edits(tree, text, call, name)
    elif "torch" in modules and _optimizer_steps(tree):
        framework, edits = PYTORCH, _pytorch_edits(tree, text, name)
    else:
        raise NotApplicable(f"{name}: no Hugging Face Trainer, Lightning Trainer or PyTorch loop with "
                            "optimizer.step() found; see docs/integrations.md for the lines to add by hand")
    new = text.apply(edits)
    diff = "".join(difflib.unified_diff(source.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=name, tofile=name))
    return Proposal(framework=framework, source=new, diff=diff)


def _imported_modules(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _trainer_call(tree: ast.Module, exact: bool) -> ast.Call | None:
    """The first `Trainer(...)` call (exact), or any `...Trainer(...)` such as `Seq2SeqTrainer` or `SFTTrainer`."""
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    for call in sorted(calls, key=lambda c: (c.lineno, c.col_offset)):
        callee = _callee(call)
        if callee == "Trainer" or (not exact and callee.endswith("Trainer")):
            return call
    return None


def _import_edit(tree: ast.Module, text: _Source, line: str) -> _Edit:
    """`line` after the last top-level import (after the docstring where there is none)."""
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    if imports:
        return text.line_after(imports[-1], "", line)
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return text.line_after(first, "", line)
    return _Edit(0, 0, f"{line}\n")


def _add_keyword(text: _Source, call: ast.Call, keyword: str, value: str) -> _Edit:
    """`keyword=value` as the call's last argument, whatever its layout (trailing comma, several lines)."""
    arguments = [*call.args, *call.keywords]
    if not arguments:
        at = text.end(call) - 1  # just inside the closing parenthesis
        return _Edit(at, at, f"{keyword}={value}")
    last = max(arguments, key=lambda node: (node.end_lineno, node.end_col_offset))
    at = text.end(last)
    return _Edit(at, at, f", {keyword}={value}")


def _callback_edit(text: _Source, call: ast.Call, callback: str) -> _Edit:
    """The callback added to the call's `callbacks=` list, or a `callbacks=[...]` argument when it has none."""
    given = next((kw for kw in call.keywords if kw.arg == "callbacks"), None)
    if given is None:
        return _add_keyword(text, call, "callbacks", f"[{callback}]")
    if isinstance(given.value, ast.List):
        if given.value.elts:
            at = text.end(given.value.elts[-1])
            return _Edit(at, at, f", {callback}")
        at = text.start(given.value) + 1
        return _Edit(at, at, callback)
    return _Edit(text.start(given.value), text.end(given.value), f"[*{text.segment(given.value)}, {callback}]")


def _lightning_edits(tree: ast.Module, text: _Source, call: ast.Call, name: str) -> list[_Edit]:
    if not any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "fit"
               for node in ast.walk(tree)):
        raise NotApplicable(f"{name}: a Lightning Trainer but no .fit(...) call; only training with fit is supported")
    return [_import_edit(tree, text, "from vaultlayer.integrations.lightning import VaultLayerCallback"),
            _callback_edit(text, call, "VaultLayerCallback()")]


def _hf_edits(tree: ast.Module, text: _Source, call: ast.Call, name: str) -> list[_Edit]:
    statement = next((node for node in ast.walk(tree) if isinstance(node, ast.Assign) and node.value is call
                      and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)), None)
    if statement is None:
        raise NotApplicable(f"{name}: the Trainer is not assigned to a name (trainer = Trainer(...)), so its "
                            ".train() call cannot be found; see docs/integrations.md for the lines to add by hand")
    trainer = statement.targets[0].id
    train = next((node for node in ast.walk(tree) if isinstance(node, ast.Call)
                  and isinstance(node.func, ast.Attribute) and node.func.attr == "train"
                  and isinstance(node.func.value, ast.Name) and node.func.value.id == trainer), None)
    if train is None:
        raise NotApplicable(f"{name}: no {trainer}.train() call found")
    if train.args or any(kw.arg == "resume_from_checkpoint" for kw in train.keywords):
        raise NotApplicable(f"{name}: {trainer}.train() already chooses a checkpoint to resume from; pass "
                            "resume_from_checkpoint=vl_callback.restored_checkpoint() there by hand")
    callback = _free_name(tree, "vl_callback")
    return [_import_edit(tree, text, "from vaultlayer.integrations.hf import VaultLayerCallback"),
            text.line_before(statement, f"{callback} = VaultLayerCallback()"),
            _callback_edit(text, call, callback),
            _add_keyword(text, train, "resume_from_checkpoint", f"{callback}.restored_checkpoint()")]


def _optimizer_steps(tree: ast.Module) -> list[ast.Call]:
    """`X.step()` calls where X is an optimizer: a name made by `torch.optim.*(...)`, or named like one."""
    optimizers = {name for name, kind in _constructed(tree).items() if kind == "optimizer"}
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "step" and isinstance(node.func.value, ast.Name)
            and (node.func.value.id in optimizers or "optim" in node.func.value.id.lower())]


def _constructed(tree: ast.Module) -> dict[str, str]:
    """Names assigned an optimizer or a scheduler: `opt = torch.optim.Adam(...)`, `sched = ...lr_scheduler.X(...)`."""
    kinds = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and isinstance(node.value, ast.Call):
            dotted = ast.unparse(node.value.func)
            if "lr_scheduler" in dotted:
                kinds[node.targets[0].id] = "scheduler"
            elif dotted.startswith(("torch.optim.", "optim.")):
                kinds[node.targets[0].id] = "optimizer"
    return kinds


def _pytorch_edits(tree: ast.Module, text: _Source, name: str) -> list[_Edit]:
    step = _optimizer_steps(tree)[0]
    loop = _enclosing_loop(tree, step)
    if loop is None or not (isinstance(loop.target, ast.Name) and isinstance(loop.iter, ast.Call)
                            and _callee(loop.iter) == "range" and len(loop.iter.args) == 1
                            and not loop.iter.keywords):
        raise NotApplicable(f"{name}: the loop around {ast.unparse(step)} is not one `for step in range(steps)` (epoch and batch loops "
                            "need the lines placed by hand); see "
                            "docs/integrations.md for the Checkpointer lines to add by hand")
    if loop.body[0].lineno == loop.lineno:
        raise NotApplicable(f"{name}: the training loop is on one line; put its body on lines of its own")
    optimizer = step.func.value.id
    kinds = _constructed(tree)
    scheduler = next((n for n, kind in kinds.items() if kind == "scheduler"), None)
    model = _model_of(tree, optimizer)
    if model is None:
        raise NotApplicable(f"{name}: cannot tell which model {optimizer} trains (expected "
                            f"{optimizer} = torch.optim.X(model.parameters(), ...))")
    ckpt, start = _free_name(tree, "ckpt"), _free_name(tree, "start")
    parts = ", ".join(part for part in (model, optimizer, scheduler) if part)
    first_arg = loop.iter.args[0]
    return [
        _import_edit(tree, text, "from vaultlayer.pytorch import Checkpointer"),
        text.line_before(loop, f"{ckpt} = Checkpointer({parts})"),
        text.line_before(loop, f"{start} = {ckpt}.resume()  # 0 on a fresh start, else the step restored"),
        _Edit(text.start(first_arg), text.start(first_arg), f"{start}, "),
        text.line_after(loop.body[-1], text.indent(loop.body[0]),
                        f"{ckpt}.maybe_save({loop.target.id} + 1)  # at the interval, or at once on a reclaim notice"),
    ]


def _enclosing_loop(tree: ast.Module, target: ast.AST) -> ast.For | None:
    """The one `for` loop holding `target` in the innermost function that holds it (None for none or nested)."""
    found: list[ast.For] | None = None

    def visit(node: ast.AST, loops: list[ast.For]) -> bool:
        nonlocal found
        if node is target:
            found = loops
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            loops = []
        elif isinstance(node, ast.For):
            loops = [*loops, node]
        return any(visit(child, loops) for child in ast.iter_child_nodes(node))

    visit(tree, [])
    return found[0] if found and len(found) == 1 else None


def _model_of(tree: ast.Module, optimizer: str) -> str | None:
    """`model` in `optimizer = torch.optim.X(model.parameters(), ...)`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == optimizer for t in node.targets) \
                and isinstance(node.value, ast.Call) and node.value.args:
            params = node.value.args[0]
            if isinstance(params, ast.Call) and isinstance(params.func, ast.Attribute) \
                    and params.func.attr == "parameters" and isinstance(params.func.value, ast.Name):
                return params.func.value.id
    return None


def _free_name(tree: ast.Module, wanted: str) -> str:
    """`wanted`, or `vl_<wanted>` when the script already uses the name."""
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    return wanted if wanted not in used else f"vl_{wanted}"


# ---------------------------------------------------------------- the script on disk


def script_of(command: list[str], workdir: Path) -> Path | None:
    """The Python script a command runs (`python [options] train.py ...`, or `./train.py`), if it runs one."""
    if not command:
        return None
    if command[0].endswith(".py"):
        candidate = command[0]
    elif Path(command[0]).name.startswith("python"):
        rest = iter(command[1:])
        candidate = None
        for arg in rest:
            if arg in ("-m", "-c", "-"):
                return None
            if arg in _INTERPRETER_OPTIONS_WITH_VALUE:
                next(rest, None)
            elif not arg.startswith("-"):
                candidate = arg
                break
        if candidate is None or not candidate.endswith(".py"):
            return None
    else:
        return None
    path = workdir / candidate
    return path if path.is_file() else None


def proposal_for(path: Path) -> Proposal:
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise NotApplicable(f"cannot read {path}: {err}") from None
    return propose(source, path.name)


def write(path: Path, proposal: Proposal) -> Path:
    """The new script in place (atomically), the original kept beside it as SCRIPT.bak."""
    backup = path.with_name(path.name + ".bak")
    shutil.copy2(path, backup)
    partial = path.with_name(f".{path.name}.vl-{os.getpid()}")
    partial.write_text(proposal.source)
    shutil.copymode(path, partial)
    os.replace(partial, path)
    return backup
