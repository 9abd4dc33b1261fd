"""The ``jaxdiv`` console command: one entry point for the runnable experiments.

    jaxdiv demo [...]         a diversity demo on the toys (experiments.demo)
    jaxdiv generate [...]     prompts -> PNG images + metadata (experiments.generate)
    jaxdiv evaluate [...]     image folders -> diversity / fidelity tables (experiments.evaluate)
    jaxdiv sd-methods [...]   every diversity method on one SD model (experiments.sd_methods)
    jaxdiv methods [--json]   the diversity and guidance methods jaxdiv offers

Each command but ``methods`` is a thin wrapper: its arguments go unchanged to the module's
``main(argv)`` (``jaxdiv generate --help`` is ``python -m experiments.generate --help``),
the module is imported only when its command runs, and its exit status is the command's.
An unknown command exits 2 with one line on stderr.

From the console (``argv`` not given), a command that runs models first starts itself again
under :data:`jaxdiv.host_memory.REUSE_FREED_MEMORY` (glibc malloc keeps freed memory for
reuse: XLA:CPU's per-call buffers stop page-faulting; see :mod:`jaxdiv.host_memory`);
``JAXDIV_REUSE_MEMORY=0`` in the environment keeps the process as it started. Those
commands also keep their compiled XLA programs on disk for the next run
(:mod:`jaxdiv.compilation_cache`: ``~/.cache/jaxdiv/xla`` by default,
``JAXDIV_COMPILATION_CACHE=<folder>`` picks another, ``JAXDIV_COMPILATION_CACHE=0`` turns it
off).

``jaxdiv methods`` reads the factories of :mod:`jaxdiv.guidance` themselves: the knobs
and their defaults come from the signatures, the hook from a term built with placeholder
arguments, and the command-line flags of ``jaxdiv generate`` from
:data:`experiments.generate.METHOD_KNOBS`; only the papers and their values are written
here (from ``PAPERS.md``).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import json
import sys
import textwrap
from typing import Any, NamedTuple

PROG = "jaxdiv"

# command -> (module, one-line summary)
COMMANDS = {
    "demo": ("experiments.demo", "a diversity demo on the toy targets"),
    "generate": ("experiments.generate", "prompts -> PNG images from a local SD folder"),
    "evaluate": ("experiments.evaluate", "image folders -> diversity and fidelity tables"),
    "sd-methods": ("experiments.sd_methods", "every diversity method on one SD model"),
    "plot": ("experiments.plot_eval", "an evaluate folder -> Pareto plots, prompt grids"),
    "methods": (None, "the diversity and guidance methods: papers, hooks, knobs"),
}  # fmt: skip
# the commands that run JAX programs (their process reuses freed memory, and keeps its
# compiled programs on disk)
JAX_COMMANDS = ("demo", "generate", "evaluate", "sd-methods")
# the commands whose rerun resumes (generate's images, evaluate's cached features)
RESUMABLE = ("generate", "evaluate")

# what each hook of jaxdiv.guidance.base.HOOKS acts on
HOOK_MEANING = {
    "condition": "the condition, before the model call",
    "denoiser": "combines the model calls (the model output)",
    "x0": "the predicted clean sample x0_hat, after the model call",
    "model": "inside the network's forward pass (a model hook)",
}


class Method(NamedTuple):
    """One diversity or guidance method of :mod:`jaxdiv.guidance`.

    Attributes:
        name: the factory's name in ``jaxdiv.guidance``.
        paper: authors, year and short title.
        probe: builds a term with placeholder arguments (to read its hook).
        paper_values: knob -> the paper's value (or why there is none).
        notes: one line: what it does / where its other knobs are.
        generate: the method's name in ``jaxdiv generate --method`` (None: not a method
            there; CFG is ``--cfg``).
    """

    name: str
    paper: str
    probe: Any
    paper_values: dict
    notes: str = ""
    generate: str | None = None


# jaxdiv.guidance's batch flags, as `jaxdiv methods` says them
BATCH_FLAGS = {
    "couples_batch": "couples the images of a batch (jaxdiv.sample(..., groups=G) keeps G "
                     "groups apart; pipe.generate: one group per prompt)",
    "needs_batch": "acts only between images (n >= 2)",
    "prompt_bound": "holds its prompts' data (one term per prompt: guidance.per_group)",
}  # fmt: skip


def _gass_probe(g):
    import jax.numpy as jnp

    return g.gass(lambda x: x, jnp.ones(16))


def _tpso_probe(g):
    import jax.numpy as jnp

    return g.tpso(jnp.zeros((1, 1)))


METHODS = (
    Method(
        "cfg", "Ho & Salimans 2022, Classifier-Free Diffusion Guidance",
        lambda g: g.cfg(2.0),
        {"scale": "no single value; diffusers' defaults 7.5 (SD 1.x/2.x), 7.0 (SD3)",
         "null_cond": "the empty prompt's embedding",
         "rescale": "0.7 (Lin et al. 2024, Sec. 3.4; diffusers' guidance_rescale)"},
        "D_u + w (D_c - D_u) on one doubled batch (diffusers convention: w = 1 is no "
        "guidance)",
    ),
    Method(
        "interval", "Kynkaanniemi et al. 2024, Applying Guidance in a Limited Interval",
        lambda g: g.interval(2.0, 0.19, 1.61),
        {"scale": "EDM2: 2.0", "sigma_lo": "EDM2: 0.19; SD-XL: 0.28",
         "sigma_hi": "EDM2: 1.61; SD-XL: 5.42",
         "per_step": "EDM2's official code: True (one decision per Heun step)",
         "rescale": "not in the paper; cfg's (Lin et al. 2024), inside the interval"},
        "CFG only for noise levels sigma/alpha in (sigma_lo, sigma_hi], D_c outside",
        "interval",
    ),
    Method(
        "cads", "Sadat et al. 2024, CADS: Condition-Annealed Sampling",
        lambda g: g.cads(),
        {"tau1": "0.6 (some text-to-image setups 0.3)",
         "tau2": "0.9 (some text-to-image setups 0.8)", "noise_scale": "0.25", "psi": "1"},
        "annealed Gaussian noise on the condition, rescaled to its mean / std",
        "cads",
    ),
    Method(
        "particle", "Corso et al. 2024, Particle Guidance: non-I.I.D. Diverse Sampling",
        lambda g: g.particle(0.1),
        {"strength": "no published SD value",
         "bandwidth": "median: median d^2 / log(B - 1)",
         "time_scaling": "score; PG's public SD code: eps",
         "min_noise_level": "None; PG's public SD code: 1.0"},
        "RBF repulsion between the batch's particles (x_t), added to the score",
        "particle",
    ),
    Method(
        "spell", "Kirchhof et al. 2025, Shielded Diffusion: Sparse Repellency (SPELL)",
        lambda g: g.spell(1.0),
        {"radius": "App. D: median pairwise distance of an unguided batch's final samples "
                   "(recipes.radius_from_unguided); two moons 0.075",
         "overcompensation": "1.6 for SD3 / LDM (1.0 is exact)"},
        "relu(r / |x0_hat - z| - 1)(x0_hat - z) away from shields: a reference set, the "
        "batch, earlier batches; keyword-only: memory_size, feature_map, ...",
        "spell",
    ),
    Method(
        "gass", "Zhu et al. 2026, GASS: Geometry-Aware Spherical Sampling",
        _gass_probe,
        {"r_dep": "0.02", "r_ind": "0.02", "num_directions": "10", "lr": "1e-4",
         "max_iters": "60", "patience": "4", "tol": "5e-4", "num_active": "20 (uniform)"},
        "spread on the image encoder's sphere along e_t and u_ind, written back into x0_hat "
        "by Adam",
        "gass",
    ),
    Method(
        "tpso", "arXiv 2511.19811 (2025), Prompt Semantic Space Optimization (TPSO)",
        _tpso_probe,
        {"ratio": "0.4 (0.3 .. 0.5)"},
        "optimised prompt variants faded into the prompt; the variants from "
        "jaxdiv.guidance.tpso's optimize_offsets (kappa 0.8, tolerance 0.01, diversity_weight "
        "1 for SD 1.5 / 2.1 and 10 for SD3.5, RMSprop lr 0.01, max_steps 50 / 200); tpso_null for "
        "CFG's negative branch",
        "tpso",
    ),
    Method(
        "contextual", "Dahary et al. 2026, On-the-Fly Repulsion in the Contextual Space "
        "of Diffusion Transformers",
        lambda g: g.contextual(1.0),
        {"eta": "a range: SD3.5-Large 5e2 .. 5e6, SD3.5-Turbo 1e5 .. 1e7",
         "inner_steps": "100 (SD3.5; Flux-dev 50)",
         "tau": "4 (SD3.5-Large; Turbo and Flux-dev 1)"},
        "log-Vendi ascent on the MMDiT text stream after the joint blocks, first tau steps",
        "contextual",
    ),
)  # fmt: skip


def _knobs(factory) -> list[dict]:
    """The factory's parameters: name, default (``None`` when required), keyword-only."""
    out = []
    for p in inspect.signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        required = p.default is p.empty
        out.append({"name": p.name, "required": required,
                    "default": None if required else p.default,
                    "keyword_only": p.kind is p.KEYWORD_ONLY})  # fmt: skip
    return out


def methods_table() -> list[dict]:
    """Every method of :data:`METHODS` as a dict: factory, paper, hook (read from a built
    term), knobs (from the signature) with the paper's values, the generate flags."""
    from experiments.generate import METHOD_KNOBS
    from jaxdiv import guidance

    rows = []
    for m in METHODS:
        factory = getattr(guidance, m.name)
        probe = m.probe(guidance)
        hook = probe.hook
        batch = {flag: getattr(guidance, flag)(probe) for flag in BATCH_FLAGS}
        knobs = _knobs(factory)
        for k in knobs:
            k["paper"] = m.paper_values.get(k["name"])
        if m.name == "cfg":
            flags = ["--cfg", "--guidance-rescale"]
        elif m.generate is None:
            flags = []
        else:
            flags = [f"--method {m.generate}"] + [f for _, f, _, _ in METHOD_KNOBS[m.generate]]
            if m.name in ("interval", "tpso"):  # their own CFG takes the rescale
                flags.append("--guidance-rescale")
        rows.append({"factory": f"guidance.{m.name}", "paper": m.paper, "hook": hook,
                     "hook_meaning": HOOK_MEANING.get(hook, ""), "knobs": knobs,
                     "notes": m.notes, "batch": batch,
                     "generate_flags": flags})  # fmt: skip
    return rows


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _wrap(text: str, indent: str, width: int = 92) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "    ",
                         break_on_hyphens=False, break_long_words=False)  # fmt: skip


def format_methods(rows: list[dict]) -> str:
    """The text of ``jaxdiv methods``."""
    lines = textwrap.wrap("Diversity and guidance methods of jaxdiv.guidance: each knob with "
                          "its default and, in parentheses, the paper's value. Compose terms "
                          "with guidance.chain(...).", 92)  # fmt: skip
    lines += ["Hooks:"] + [f"  {h:<9} {m}" for h, m in HOOK_MEANING.items()] + [""]
    for r in rows:
        lines.append(f"{r['factory']}  [hook: {r['hook']}]")
        lines += _wrap(f"paper: {r['paper']}", "    ")
        if r["notes"]:
            lines += _wrap(f"what: {r['notes']}", "    ")
        main = [k for k in r["knobs"] if not k["keyword_only"]]
        extra = [k for k in r["knobs"] if k["keyword_only"]]
        for k in main:
            value = "required" if k["required"] else f"= {_show(k['default'])}"
            paper = f"  (paper: {k['paper']})" if k["paper"] else ""
            lines += _wrap(f"{k['name']} {value}{paper}", "    ")
        if extra:
            lines += _wrap("keyword-only: " + ", ".join(
                f"{k['name']}={_show(k['default'])}" for k in extra), "    ")  # fmt: skip
        said = [text for flag, text in BATCH_FLAGS.items() if r["batch"][flag]]
        lines += _wrap("batch (at its defaults): " + ("; ".join(said) or "per sample"), "    ")
        if r["generate_flags"]:
            lines += _wrap("jaxdiv generate: " + " ".join(r["generate_flags"]), "    ")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def methods_main(argv=None, prog: str = f"{PROG} methods") -> int:
    """``jaxdiv methods [--json]``."""
    p = argparse.ArgumentParser(prog=prog, description=COMMANDS["methods"][1])
    p.add_argument("--json", action="store_true",
                   help="print the list as JSON (default: text)")  # fmt: skip
    args = p.parse_args(argv)
    rows = methods_table()
    if args.json:
        print(json.dumps(rows, indent=1, default=repr))
    else:
        print(format_methods(rows), end="")
    return 0


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Diversity guidance for diffusion and flow samplers, in pure JAX.",
        epilog=f"commands:\n{listing}\n\n`{PROG} COMMAND --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    p.add_argument("command", metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="...",
                   help="the command's own arguments")  # fmt: skip
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("jaxdiv")
    except Exception:  # not installed (a source checkout)
        return "unknown"


def restarts_for_memory(command: str, from_console: bool, env=None) -> bool:
    """Whether ``jaxdiv COMMAND`` starts itself again under reused host memory: from the
    console, for the commands that run models (:data:`JAX_COMMANDS`), unless
    ``JAXDIV_REUSE_MEMORY=0`` or the setting is already in place.

    >>> restarts_for_memory("generate", True, {}), restarts_for_memory("methods", True, {})
    (True, False)
    >>> restarts_for_memory("generate", True, {"JAXDIV_REUSE_MEMORY": "0"})
    False
    """
    import os

    from jaxdiv.host_memory import OPT_OUT_VARIABLE, reusing_freed_memory

    env = os.environ if env is None else env
    return (
        from_console
        and command in JAX_COMMANDS
        and env.get(OPT_OUT_VARIABLE, "1") != "0"
        and not reusing_freed_memory(env)
    )


def uses_compilation_cache(command: str, from_console: bool) -> bool:
    """Whether ``jaxdiv COMMAND`` keeps compiled programs on disk: from the console, for
    the commands that run models (:data:`JAX_COMMANDS`;
    :func:`jaxdiv.compilation_cache.from_environment` decides the folder, or none).

    >>> uses_compilation_cache("generate", True), uses_compilation_cache("plot", True)
    (True, False)
    >>> uses_compilation_cache("generate", False)  # main(argv) from Python: its caller's choice
    False
    """
    return from_console and command in JAX_COMMANDS


def main(argv=None) -> int:
    """Run ``jaxdiv COMMAND ARGS...``; returns the command's exit status (a command that
    exits, e.g. on ``--help`` or a bad value, raises ``SystemExit`` as it would alone)."""
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    if not argv:
        p.print_help(sys.stderr)
        return 2
    args = p.parse_args(argv)
    if args.command not in COMMANDS:
        close = difflib.get_close_matches(args.command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        p.exit(2, f"{PROG}: error: unknown command {args.command!r} (choose from "
                  f"{', '.join(COMMANDS)}){hint}\n")  # fmt: skip
    if restarts_for_memory(args.command, from_console):
        from jaxdiv.host_memory import restart_with_reused_memory

        restart_with_reused_memory()  # returns only where there is no glibc
    if uses_compilation_cache(args.command, from_console):
        from jaxdiv import compilation_cache

        try:
            compilation_cache.from_environment()
        except ValueError as err:
            p.exit(2, f"{PROG}: error: {err}\n")
    prog = f"{PROG} {args.command}"
    module_name = COMMANDS[args.command][0]
    if module_name is None:
        return methods_main(args.args, prog)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"{prog}: error: {module_name} is not available in this installation",
              file=sys.stderr)  # fmt: skip
        return 1
    run = module.main
    try:
        takes_prog = "prog" in inspect.signature(run).parameters
    except (TypeError, ValueError):
        takes_prog = False
    try:
        status = run(args.args, prog=prog) if takes_prog else run(args.args)
    except KeyboardInterrupt:  # Ctrl-C: what was written is whole (atomic writes, locks)
        resumes = args.command in RESUMABLE
        print(f"\n{prog}: interrupted" + ("; the same command resumes where it stopped"
                                          if resumes else ""), file=sys.stderr)  # fmt: skip
        return 130
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
