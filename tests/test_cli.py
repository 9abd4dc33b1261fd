"""The ``jaxdiv`` console command (experiments.cli) and the shared progress bar."""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from experiments import cli, common
from jaxdiv import guidance
from jaxdiv.guidance.base import HOOKS

# names in jaxdiv.guidance.__all__ that are not diversity / guidance methods: combinators,
# helpers of a method, index builders. A new public function must be classified: listed
# by `jaxdiv methods` (cli.METHODS) or here.
NOT_METHODS = {
    "as_terms", "chain", "stateless", "window", "per_group",  # combinators
    "couples_batch", "needs_batch", "prompt_bound",  # properties of terms
    "cads_gamma", "cads_time",
    "spell_delta", "memory_vectors", "median_pairwise_distance", "repulsion_field",
    "repulsion_potential", "radius_search", "build_sharded_index",
    "tpso_null",  # TPSO's negative branch, listed with tpso
    "gass_targets", "spherical_targets", "spp_loss", "active_steps", "expected_gram_det",
    "repel_context", "contextual_hook",
}  # fmt: skip

ENTRY_MODULES = {"generate": "experiments.generate", "evaluate": "experiments.evaluate",
                 "sd-methods": "experiments.sd_methods"}  # fmt: skip


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_help_lists_every_command(capsys):
    code, out, _ = _exit_code(["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: jaxdiv")
    for name in ("demo", "generate", "evaluate", "sd-methods", "plot", "methods"):
        assert f"\n  {name} " in out, name


def test_no_command_prints_the_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: jaxdiv" in capsys.readouterr().err


@pytest.mark.parametrize("argv,hint", [(["nope"], None), (["generat", "--n", "1"], "generate")])
def test_unknown_command_exits_2_in_one_line(capsys, argv, hint):
    code, out, err = _exit_code(argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"jaxdiv: error: unknown command {argv[0]!r} (choose from demo, ")
    if hint:
        assert f"did you mean {hint!r}?" in err


def test_methods_lists_every_public_method(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    listed = {m.name for m in cli.METHODS}
    public = {n for n in guidance.__all__ if inspect.isfunction(getattr(guidance, n))}
    # every public function is either a listed method or a known non-method
    assert public - NOT_METHODS == listed, "classify new names of jaxdiv.guidance.__all__"
    assert not listed & NOT_METHODS
    for name in listed:
        assert f"guidance.{name}  [hook: " in out, name
    # every factory returning a GuidanceTerm (but the combinators) is a method
    for name in public - {"stateless", "window"}:
        returns = inspect.signature(getattr(guidance, name)).return_annotation
        if getattr(returns, "__name__", returns) == "GuidanceTerm":
            assert name in listed, name


def test_methods_json_reads_hooks_and_knobs_from_the_factories(capsys):
    assert cli.main(["methods", "--json"]) == 0
    rows = {r["factory"].split(".")[1]: r for r in json.loads(capsys.readouterr().out)}
    expected_hooks = {"cfg": "denoiser", "interval": "denoiser", "cads": "condition",
                      "tpso": "condition", "particle": "x0", "spell": "x0", "gass": "x0",
                      "contextual": "model"}  # fmt: skip
    assert {n: r["hook"] for n, r in rows.items()} == expected_hooks
    # how each acts on a batch, read from a built term (jaxdiv.guidance's batch flags)
    coupled = {n for n, r in rows.items() if r["batch"]["couples_batch"]}
    assert coupled == {"particle", "spell", "gass", "contextual"}
    assert {n for n, r in rows.items() if r["batch"]["needs_batch"]} == {
        "particle", "spell", "contextual"}
    assert {n for n, r in rows.items() if r["batch"]["prompt_bound"]} == {"gass", "tpso"}
    for m in cli.METHODS:
        params = inspect.signature(getattr(guidance, m.name)).parameters
        row = rows[m.name]
        assert row["hook"] in HOOKS
        assert [k["name"] for k in row["knobs"]] == list(params)
        # the paper's values name real knobs (a renamed parameter fails here)
        assert set(m.paper_values) <= set(params), m.name
        for k in row["knobs"]:
            p = params[k["name"]]
            assert k["required"] == (p.default is p.empty)
            if not k["required"] and isinstance(p.default, int | float | str | type(None)):
                assert k["default"] == p.default
    assert rows["spell"]["generate_flags"][:2] == ["--method spell", "--spell-radius"]
    assert rows["cfg"]["generate_flags"] == ["--cfg", "--guidance-rescale"]
    assert rows["interval"]["generate_flags"][-1] == "--guidance-rescale"
    spell = {k["name"]: k for k in rows["spell"]["knobs"]}
    assert spell["overcompensation"]["default"] == 1.0
    assert "1.6" in spell["overcompensation"]["paper"]


@pytest.mark.parametrize("command", sorted(ENTRY_MODULES))
def test_help_of_a_command_is_the_module_help(capsys, command):
    code, out, _ = _exit_code([command, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: jaxdiv {command} ")
    assert "--quiet" in out and "--out" in out
    if command != "evaluate":
        assert "--spell-overcompensation" in out and "1.6" in out


@pytest.mark.parametrize("command", sorted(ENTRY_MODULES))
def test_every_option_states_its_default(monkeypatch, command):
    """Each option's help gives its default (or says it is required)."""
    seen = []

    class Stop(Exception):
        pass

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise Stop

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module = importlib.import_module(ENTRY_MODULES[command])
    with pytest.raises(Stop):
        module.parse_args([])
    (parser,) = seen
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        assert "default" in text or "required" in text, (action.option_strings, text)


def test_dispatch_passes_argv_through_and_propagates_the_status(monkeypatch):
    """A command's module is imported on use only, gets the arguments unchanged and
    returns its status (experiments.demo stands in)."""
    calls = []
    fake = types.ModuleType("experiments.demo")
    fake.main = lambda argv: calls.append(argv) or 3
    monkeypatch.setitem(sys.modules, "experiments.demo", fake)
    assert cli.main(["demo", "--out", "x", "--quiet", "-n", "2"]) == 3
    assert calls == [["--out", "x", "--quiet", "-n", "2"]]
    fake.main = lambda argv: None
    assert cli.main(["demo"]) == 0


@pytest.mark.parametrize("command, module, resumes", [
    ("generate", "experiments.generate", True), ("demo", "experiments.demo", False)])
def test_ctrl_c_is_one_line_and_says_whether_a_rerun_resumes(monkeypatch, capsys, command,
                                                             module, resumes):  # fmt: skip
    fake = types.ModuleType(module)

    def interrupted(argv):
        raise KeyboardInterrupt

    fake.main = interrupted
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([command]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"jaxdiv {command}: interrupted" + (
        "; the same command resumes where it stopped" if resumes else "")


def test_generate_errors_name_the_console_command(tmp_path, capsys):
    code, _, err = _exit_code(["generate", "--model", str(tmp_path), "--prompt", "a cat",
                               "--n", "0"], capsys)  # fmt: skip
    assert code == 2
    assert err == "jaxdiv generate: error: --n must be >= 1, got 0\n"


def test_plot_is_the_console_command_of_plot_eval(tmp_path, capsys):
    code, out, _ = _exit_code(["plot", "--help"], capsys)
    assert code == 0 and out.startswith("usage: jaxdiv plot ") and "(default 8)" in out
    code, _, err = _exit_code(["plot", str(tmp_path)], capsys)
    assert code == 2
    assert err == f"jaxdiv plot: error: {str(tmp_path)!r} holds no results.json of " \
                  "experiments.evaluate\n"


def test_demo_errors_name_the_console_command(capsys):
    code, _, err = _exit_code(["demo", "--batch", "1"], capsys)
    assert code == 2
    assert err == "jaxdiv demo: error: --batch must be >= 2, got 1\n"


def test_a_missing_command_module_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "demo", ("experiments.no_such_module", "x"))
    assert cli.main(["demo"]) == 1
    assert "experiments.no_such_module is not available" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_terminal_only():
    tty = _Terminal()
    bar = common.progress_bar(range(4), desc="work", unit="img", file=tty)
    assert not bar.disable  # (closing a bar disables it)
    assert list(bar) == [0, 1, 2, 3]
    bar.close()
    drawn = tty.getvalue()
    assert "work" in drawn and "4/4" in drawn and "img/s" in drawn
    # quiet: nothing, even on a terminal
    tty = _Terminal()
    with common.progress_bar(total=4, desc="work", quiet=True, file=tty) as bar:
        bar.update(4)
    assert bar.disable and tty.getvalue() == ""
    with common.quiet():
        assert common.progress_bar(total=1, file=_Terminal()).disable
    # not a terminal (CI logs, pipes): no bar
    pipe = io.StringIO()
    with common.progress_bar(total=4, desc="work", file=pipe) as bar:
        bar.update(4)
    assert bar.disable and pipe.getvalue() == ""
    # forced on (e.g. a notebook)
    pipe = io.StringIO()
    with common.progress_bar(total=2, desc="forced", file=pipe, enabled=True) as bar:
        bar.update(2)
    assert "2/2" in pipe.getvalue()


def test_messages_print_above_a_bar_and_not_when_quiet(capsys):
    tty = _Terminal()
    with common.progress_bar(total=2, desc="work", file=tty) as bar:
        bar.update()
        common.say("generate", "loaded the model")
    assert capsys.readouterr().out == "[generate] loaded the model\n"
    with common.quiet():
        common.say("generate", "hidden")
    common.say("generate", "shown")
    assert capsys.readouterr().out == "[generate] shown\n"
    assert common.progress_enabled(file=io.StringIO()) is False
    assert common.progress_enabled(file=_Terminal()) is True


def test_installed_console_script():
    exe = Path(sys.executable).parent / "jaxdiv"
    if not exe.exists():
        exe = shutil.which("jaxdiv")
    if exe is None:
        pytest.skip("the jaxdiv console script is not installed (pip install -e .)")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "generate" in proc.stdout and "sd-methods" in proc.stdout
    proc = subprocess.run([str(exe), "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown command 'nope'" in proc.stderr
