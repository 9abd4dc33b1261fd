"""The research scripts of experiments/ (the toys behind the README's numbers) build their
command lines and refuse bad values in the parser's one line, before any computation
(they used to fail deep in the run: ``pg_ring --runs 0`` with an IndexError). Their runs
themselves are the commands the README quotes."""

import importlib

import pytest

SCRIPTS = {
    "gass_toy": (["--batch-size", "3"], "--batch-size: must be an integer >= 4, got '3'"),
    "pg_ring": (["--runs", "0"], "--runs: must be an integer >= 1, got '0'"),
    "spell_protection": (["--radius", "nan"], "--radius: must be a finite number > 0, got 'nan'"),
    "spell_sparsity": (["--steps", "-2"], "--steps: must be an integer >= 1, got '-2'"),
    "spell_tradeoff": (["--seed", "-1"], "--seed: must be an integer in [0, 2**62), got '-1'"),
    "spell_two_moons": (["--n", "1"], "--n: must be an integer >= 2, got '1'"),
    "toy_suite": (["--n", "many"], "--n: must be an integer >= 2, got 'many'"),
    "tradeoff": (["--seed", str(2**62)], "--seed: must be an integer in [0, 2**62)"),
    "train_two_moons_mlp": (["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_research_script_refuses_a_bad_value_in_one_line(name, capsys):
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0 and "--out" in capsys.readouterr().out
    argv, message = SCRIPTS[name]
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err.splitlines()[-1], err
