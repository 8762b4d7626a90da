"""Generated files: shell completions and the man page, from the CLI's own metadata.

    python -m devtools.docs          # rewrite completions/ and man/ in the current directory
    python -m devtools.docs --check  # exit 1 if the committed files differ (the tests do this)

The completion scripts are Typer's (they call back into ``diffgen`` with ``_DIFFGEN_COMPLETE``
set; that path imports no torch). The man page is roff written from the click command tree,
so every command and option is documented where the code declares it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from diffgen import __version__
from diffgen.cli.completion import SHELLS, completion_script


ENVIRONMENT = [
    ("DIFFGEN_MODEL", "Default for --model."),
    ("DIFFGEN_DEBUG", "Set to 1 to see tracebacks instead of one-line errors."),
    ("DIFFGEN_CONFIG", "Path of the config file, instead of the one under XDG_CONFIG_HOME."),
    ("XDG_CONFIG_HOME", "Where the config file lives: $XDG_CONFIG_HOME/diffgen/config.toml (default ~/.config)."),
    ("HF_HOME", "The Hugging Face home; models are cached under $HF_HOME/hub (default ~/.cache/huggingface)."),
    ("HF_HUB_CACHE", "The Hugging Face hub cache itself, when it is not $HF_HOME/hub."),
    ("HF_HUB_OFFLINE", "Set to 1 to never contact the Hub (like --offline)."),
    ("DIFFGEN_CACHE", "diffgen's cache directory (default $XDG_CACHE_HOME/diffgen, else ~/.cache/diffgen)."),
    ("DIFFGEN_QUANT_CACHE", "Set to 0 to neither read nor write the quantised-weights cache."),
    ("DIFFGEN_CUDA_GRAPHS", "Set to 0 to run the fast step eagerly on CUDA instead of replaying it from CUDA graphs."),
    ("TRITON_CACHE_DIR", "Where Triton keeps the compiled kernels (fused sampler, grouped experts) for later runs."),
    ("TORCHINDUCTOR_CACHE_DIR", "Where torch.compile keeps what --compile generated, so a second process compiles less."),
    ("NO_COLOR", "Set to anything to disable colours (like --no-color)."),
]
FILES = [
    ("~/.config/diffgen/config.toml",
     "Defaults for any option, e.g. model = \"...\", quant = \"nf4\", think = true, and per-command tables such as "
     "[batch]. Precedence: flags > environment > config file > built-in defaults. diffgen info shows it."),
    ("~/.cache/huggingface/hub", "The Hugging Face cache that --model Hub ids resolve through and diffgen pull fills."),
    ("~/.cache/diffgen/quantized",
     "Quantised expert weights, one directory per checkpoint revision and scheme, written by the first quantised "
     "load and read by later ones (about the quantised experts' size each; safe to delete)."),
]
EXIT_STATUS = [("0", "Success."), ("1", "An error (one line on stderr says what to do); for batch: some records failed."),
               ("2", "A usage error: a bad option, an empty prompt, a trace or config that cannot be read."),
               ("130", "Interrupted (Ctrl-C).")]
EXAMPLES = [
    ("Summarise a file through a pipe:", 'cat notes.md | diffgen run "Summarise this"'),
    ("A batch job that can be resumed after a crash:", "diffgen batch jobs.jsonl -o out.jsonl --resume"),
    ("Watch the denoising and keep a trace:", 'diffgen run --show-steps --trace run.jsonl "Write a haiku"'),
    ("Which quantisation fits this machine:", "diffgen info -m google/diffusiongemma-26B-A4B-it"),
]


def _roff(text: str) -> str:
    text = text.replace("\\[", "[")  # Rich's escape of a literal bracket in help text (diffgen\[images])
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        line = line.strip()
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(line for line in lines if line)


def _option(param: Any) -> str:
    names = ", ".join(f"\\fB{_roff(opt)}\\fR" for opt in [*param.opts, *getattr(param, "secondary_opts", [])])
    longest = max(param.opts, key=len).lstrip("-").upper().replace("-", "_")
    meta = "" if getattr(param, "is_flag", False) else f" \\fI{_roff(param.metavar or longest)}\\fR"
    help_text = getattr(param, "help", None) or ""
    envvar = getattr(param, "envvar", None)
    if envvar:
        help_text += f" [env: {envvar}]"
    default = _default(param)
    if default:
        help_text += f" [default: {default}]"
    return f".TP\n{names}{meta}\n{_roff(help_text) or '(no description)'}"


def _default(param: Any) -> str:
    """The default the help shows: the option's own words, or its value (on/off flags: only when on)."""
    if isinstance(param.show_default, str):
        return param.show_default
    if param.show_default is False or param.default is None or callable(param.default):
        return ""
    if getattr(param, "is_flag", False):
        return "on" if param.default is True else ""
    return str(param.default)


def _metavar(param: Any) -> str:
    return (param.metavar or param.name).upper()


def man_page() -> str:
    import typer.main

    from diffgen.cli.app import app

    root = typer.main.get_command(app)
    out = [
        f'.TH DIFFGEN 1 "" "diffgen {__version__}" "User Commands"',
        ".SH NAME",
        "diffgen \\- run DiffusionGemma text\\-diffusion models locally",
        ".SH SYNOPSIS",
        ".B diffgen",
        "[\\fB\\-\\-version\\fR] [\\fB\\-\\-no\\-color\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        _roff("diffgen runs Google DeepMind's DiffusionGemma locally: instead of one token at a time, the model "
              "denoises a canvas of tokens in parallel over a handful of steps. The answer goes to stdout; "
              "progress, plans, warnings and errors go to stderr."),
        ".SH OPTIONS",
    ]
    out += [_option(p) for p in root.params if p.name not in {"install_completion", "show_completion"}]
    out.append(".SH COMMANDS")
    for name, command in sorted(root.commands.items()):
        args = " ".join(f"[{_metavar(p)}]" if not p.required else _metavar(p)
                        for p in command.params if p.param_type_name == "argument")
        out.append(f'.SS "diffgen {name} [OPTIONS]{" " + args if args else ""}"')
        out.append(_roff(command.help or ""))
        for param in command.params:
            if param.param_type_name == "argument":
                out.append(f".TP\n\\fI{_metavar(param)}\\fR\n{_roff(getattr(param, 'help', '') or '')}")
        out += [_option(p) for p in command.params if p.param_type_name == "option" and p.name != "help"]
    out.append(".SH ENVIRONMENT")
    out += [f".TP\n.B {name}\n{_roff(text)}" for name, text in ENVIRONMENT]
    out.append(".SH FILES")
    out += [f".TP\n.I {_roff(path)}\n{_roff(text)}" for path, text in FILES]
    out.append(".SH EXIT STATUS")
    out += [f".TP\n.B {code}\n{_roff(text)}" for code, text in EXIT_STATUS]
    out.append(".SH EXAMPLES")
    for text, command in EXAMPLES:
        out += [_roff(text), ".PP", ".RS", ".nf", _roff(command), ".fi", ".RE", ".PP"]
    out.append(".SH SEE ALSO")
    out.append("The README of the diffgen project.")
    return "\n".join(out) + "\n"


def generated(root: Path) -> dict[Path, str]:
    files = {root / "completions" / name: completion_script(shell) for shell, name in SHELLS.items()}
    files[root / "man" / "diffgen.1"] = man_page()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate diffgen's completions and man page.")
    parser.add_argument("--check", action="store_true", help="Exit 1 if the files on disk differ.")
    parser.add_argument("--root", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated(args.root).items():
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'} {path}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
