"""The resume snippet: framework detection, the exact lines proposed, `vl init` and the offer on `vl run`.

(That the inserted scripts really resume after a reclaim is tests/test_integrations.py.)
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from cli.cmd_run import offer_on_run
from cli.context import UsageError
from cli.main import parser
from vaultlayer.snippet import HF, LIGHTNING, PYTORCH, NotApplicable, propose, script_of

SAMPLES = Path(__file__).resolve().parent / "samples"


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    lines = [line for line in diff.splitlines() if not line.startswith(("---", "+++"))]
    return ([line[1:].strip() for line in lines if line.startswith("-")],
            [line[1:].strip() for line in lines if line.startswith("+")])


@pytest.mark.parametrize(("sample", "framework", "removed", "added"), [
    ("lightning_fit.py", LIGHTNING,
     ["enable_progress_bar=False, enable_model_summary=False)"],
     ["from vaultlayer.integrations.lightning import VaultLayerCallback",
      "enable_progress_bar=False, enable_model_summary=False, callbacks=[VaultLayerCallback()])"]),
    ("hf_trainer.py", HF,
     ["trainer = Trainer(model=Regression(args.step_time), args=training_args, train_dataset=Pairs())",
      "trainer.train()"],
     ["from vaultlayer.integrations.hf import VaultLayerCallback",
      "vl_callback = VaultLayerCallback()",
      "trainer = Trainer(model=Regression(args.step_time), args=training_args, train_dataset=Pairs(), "
      "callbacks=[vl_callback])",
      "trainer.train(resume_from_checkpoint=vl_callback.restored_checkpoint())"]),
    ("plain_loop.py", PYTORCH,
     ["for step in range(args.steps):"],
     ["from vaultlayer.pytorch import Checkpointer",
      "ckpt = Checkpointer(model, optimizer, scheduler)",
      "start = ckpt.resume()  # 0 on a fresh start, else the step restored",
      "for step in range(start, args.steps):",
      "ckpt.maybe_save(step + 1)  # at the interval, or at once on a reclaim notice"]),
])
def test_each_framework_gets_exactly_its_lines(sample, framework, removed, added):
    source = (SAMPLES / sample).read_text()
    proposal = propose(source, sample)
    assert proposal.framework == framework
    assert changed_lines(proposal.diff) == (removed, added)
    compile(proposal.source, sample, "exec")
    with pytest.raises(NotApplicable, match="already saves through VaultLayer"):
        propose(proposal.source, sample)


def test_the_plain_loop_lines_sit_in_the_loop_and_before_it():
    new = propose((SAMPLES / "plain_loop.py").read_text()).source.splitlines()
    loop = new.index("    for step in range(start, args.steps):")
    assert new[loop - 2:loop] == ["    ckpt = Checkpointer(model, optimizer, scheduler)",
                                  "    start = ckpt.resume()  # 0 on a fresh start, else the step restored"]
    body_end = new.index("        time.sleep(args.step_time)")
    assert new[body_end + 1].startswith("        ckpt.maybe_save(step + 1)")


LIGHTNING_WITH_CALLBACKS = '''\
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

trainer = L.Trainer(
    max_steps=10,
    callbacks=[ModelCheckpoint(dirpath="ckpts")],  # keep
)
other = L.Trainer(callbacks=EXTRA,)
trainer.fit(model)
'''


def test_existing_callbacks_are_kept_and_layout_survives():
    new = propose(LIGHTNING_WITH_CALLBACKS).source
    assert 'callbacks=[ModelCheckpoint(dirpath="ckpts"), VaultLayerCallback()],  # keep' in new
    assert "other = L.Trainer(callbacks=EXTRA,)" in new, "only the first Trainer is changed"
    compile(new, "x", "exec")


def test_a_callbacks_expression_is_extended_not_replaced():
    source = "import lightning as L\ntrainer = L.Trainer(callbacks=mine,)\ntrainer.fit(model)\n"
    new = propose(source).source
    assert "L.Trainer(callbacks=[*mine, VaultLayerCallback()],)" in new
    compile(new, "x", "exec")


def test_a_trainer_without_arguments_gets_one():
    source = "from transformers import Trainer\ntrainer = Trainer()\ntrainer.train()\n"
    assert "trainer = Trainer(callbacks=[vl_callback])" in propose(source).source


@pytest.mark.parametrize(("source", "reason"), [
    ("import torch\nfor epoch in range(3):\n    for batch in data:\n        optimizer.step()\n",
     "epoch and batch loops"),
    ("import torch\nfor batch in data:\n    optimizer.step()\n", "is not one `for step in range(steps)`"),
    ("import torch\noptimizer = torch.optim.SGD(params)\nfor i in range(3):\n    optimizer.step()\n",
     "cannot tell which model"),
    ("from transformers import Trainer\nt = Trainer()\nt.train(resume_from_checkpoint=True)\n",
     "already chooses a checkpoint"),
    ("from transformers import Trainer\nTrainer().train()\n", "not assigned to a name"),
    ("import lightning as L\ntrainer = L.Trainer()\ntrainer.validate(model)\n", "no .fit(...) call"),
    ("import torch\nprint(torch.ones(1))\n", "no Hugging Face Trainer, Lightning Trainer or PyTorch loop"),
    ("def broken(:\n", "does not parse"),
])
def test_what_cannot_be_done_safely_is_refused_with_the_reason(source, reason):
    with pytest.raises(NotApplicable, match=re.escape(reason)):
        propose(source)


def test_names_in_use_are_not_shadowed():
    source = ("import torch\nckpt = 'mine'\nmodel = torch.nn.Linear(1, 1)\n"
              "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
              "for start in range(3):\n    optimizer.step()\n")
    new = propose(source).source
    assert "vl_ckpt = Checkpointer(model, optimizer)" in new
    assert "for start in range(vl_start, 3):" in new and "vl_ckpt.maybe_save(start + 1)" in new


def run_vl(argv: list[str]) -> int:
    """`vl ARGV`'s exit code, in this process (`vl`'s main ends the process)."""
    args = parser().parse_args(argv)
    return args.handler(args)


def test_vl_init_asks_then_writes_with_a_backup(tmp_path, monkeypatch, capsys):
    script = tmp_path / "train.py"
    original = (SAMPLES / "lightning_fit.py").read_text()
    script.write_text(original)

    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    assert run_vl(["init", str(script)]) == 1
    assert script.read_text() == original
    assert "+from vaultlayer.integrations.lightning import VaultLayerCallback" in capsys.readouterr().out

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    assert run_vl(["init", str(script)]) == 0
    assert script.read_text() == propose(original, "train.py").source
    assert (tmp_path / "train.py.bak").read_text() == original

    assert run_vl(["init", str(script), "--yes"]) == 0
    assert "already saves through VaultLayer" in capsys.readouterr().err
    with pytest.raises(UsageError, match="is not a file"):
        run_vl(["init", str(tmp_path / "missing.py")])


def test_vl_init_yes_writes_without_asking(tmp_path, monkeypatch):
    script = tmp_path / "loop.py"
    script.write_text((SAMPLES / "plain_loop.py").read_text())
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # nobody to ask
    assert run_vl(["init", "--yes", str(script)]) == 0
    assert "ckpt.maybe_save(step + 1)" in script.read_text()


def test_vl_run_hints_without_a_terminal_and_asks_on_one(tmp_path, monkeypatch, capsys):
    script = tmp_path / "train.py"
    original = (SAMPLES / "hf_trainer.py").read_text()
    script.write_text(original)
    command = [sys.executable, "-u", "train.py", "--steps", "3"]

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    offer_on_run(command, tmp_path)
    hint = capsys.readouterr().err.strip().splitlines()
    assert len(hint) == 1 and "vl init train.py" in hint[0] and HF in hint[0]
    assert script.read_text() == original, "no terminal: the script runs unchanged"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    offer_on_run(command, tmp_path)
    assert "+    vl_callback = VaultLayerCallback()" in capsys.readouterr().out
    assert script.read_text() == propose(original).source


def test_the_script_is_found_in_the_command(tmp_path):
    (tmp_path / "train.py").write_text("")
    python = sys.executable
    assert script_of([python, "train.py", "--x"], tmp_path) == tmp_path / "train.py"
    assert script_of([python, "-W", "ignore", "-u", "train.py"], tmp_path) == tmp_path / "train.py"
    assert script_of([python, "-m", "train"], tmp_path) is None
    assert script_of([python, "-c", "pass"], tmp_path) is None
    assert script_of(["/usr/bin/env", "train.py"], tmp_path) is None
    assert script_of([python, "missing.py"], tmp_path) is None
