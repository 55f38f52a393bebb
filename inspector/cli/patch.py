"""`cogsurgeon patch list|verify` and `cogsurgeon run --patch NAME -- COMMAND`. Top-level imports stay light (click):
torch and diffusers load inside the commands that need them.
"""

from __future__ import annotations

import sys

import click

from cogsurgeon.inspector.cli.output import print_json, progress_line


@click.group("patch")
def patch() -> None:
    """List and verify the named attention patches.

    \b
    Examples:
      cogsurgeon patch list                           # the patches, their parameters and what each does
      cogsurgeon patch verify frame-causal-attention  # against explicit-mask attention on the tiny models
      cogsurgeon patch verify block-causal-attention:chunk=2,window=4
      cogsurgeon run --patch causal-attention -- python test.py
    """


@patch.command("list", short_help="The patches, the parameters each takes and what each does.")
@click.option("--json", "as_json", is_flag=True, help='Print [{"name", "summary", "parameters"}].')
def list_patches(as_json: bool) -> None:
    """List every registered patch (built-in and installed through the `cogsurgeon.patches` entry points), with the
    parameters each takes and their defaults (give them as NAME:key=value,key=value).

    \b
    Examples:
      cogsurgeon patch list
      cogsurgeon patch list --json | jq '.[].name'
    """
    from cogsurgeon import patches
    from cogsurgeon.patches.parameters import format_value

    infos = patches.available()
    if as_json:
        print_json([
            {
                "name": info.name,
                "summary": info.summary,
                "parameters": [
                    {"name": p.name, "type": p.type_name, "default": p.default, "doc": p.doc} for p in info.parameters
                ],
            }
            for info in infos
        ])
        return
    width = max(len(info.name) for info in infos)
    for info in infos:
        click.echo(f"{info.name:<{width}}  {info.summary}")
        for p in info.parameters:
            click.echo(f"{'':<{width}}    {p.name}: {p.type_name} = {format_value(p.default)}  {p.doc}")


@patch.command("verify", short_help="Check a patch against explicit-mask attention on the tiny models.")
@click.argument("spec", metavar="NAME[:key=value,...]")
@click.option("--json", "as_json", is_flag=True, help="Print the result with every case compared.")
def verify(spec: str, as_json: bool) -> None:
    """Run patch NAME (with its parameters, if given) on the tiny models (tiny, tiny-i2v, tiny-1.5; plain and fused
    attention processors) against explicit-mask reference attention, then revert it.

    Prints the settings verified, the largest difference from the reference (must be <= 1e-4 in fp32) and whether
    the reverted model reproduces the unpatched output bit for bit. Exit 1 if either fails.

    \b
    Examples:
      cogsurgeon patch verify causal-attention
      cogsurgeon patch verify block-causal-attention:chunk=2,window=4
      cogsurgeon patch verify attention-mask --json
    """
    from cogsurgeon.patches.parameters import parse_patch_spec
    from cogsurgeon.patches.registry import resolve_options

    name, given = parse_patch_spec(spec)
    options = resolve_options(name, given)  # an unknown name or bad option: one line, exit 2, before loading torch
    from cogsurgeon.patches.verify import verify_patch

    # NAME alone: the patch's representative settings (verify.PARAMETER_SETTINGS); NAME:key=value: exactly those
    with progress_line() as say:
        result = verify_patch(name, options=options if given else None,
                              progress=lambda step: say(f"verifying {step}…"))
    if as_json:
        print_json(result.to_json())
    else:
        verdict = "PASS" if result.passed else "FAIL"
        click.echo(f"{verdict} {result.name}{_settings_text(result.settings)}: max error {result.max_error:.3g} "
                   f"(tolerance {result.tolerance:g}), "
                   f"revert bit-exact: {'yes' if result.revert_bit_exact else 'no'}")
        for case in result.details:
            if case.max_error > result.tolerance or not case.revert_bit_exact:
                click.echo(f"  failed: {case.variant} {case.processor} {case.case}: max error {case.max_error:.3g}, "
                           f"revert bit-exact: {case.revert_bit_exact}")
    if not result.passed:
        sys.exit(1)


def _settings_text(settings: tuple[dict, ...]) -> str:
    """` with chunk=2, window=4` (one setting), ` with chunk=1; chunk=2` (several), or nothing (no parameters)."""
    from cogsurgeon.patches.parameters import format_value

    texts = [", ".join(f"{key}={format_value(value)}" for key, value in setting.items()) for setting in settings]
    texts = [text for text in texts if text]
    return f" with {'; '.join(texts)}" if texts else ""


@click.command(
    "run",
    short_help="Run an unchanged program with patches on every CogVideoX transformer it builds.",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--patch", "patch_names", multiple=True, metavar="NAME[:key=value,...]",
    help="A patch to apply, with its parameters if any (repeatable).",
)
@click.option(
    "--record-attention", "record_path", metavar="FILE.json",
    help="Record the attention statistics of every forward of the model into FILE.json (see `cogsurgeon attention`).",
)
@click.option("--record-groups", default="frames", show_default=True, metavar="frames|grid:RxC|words",
              help="How --record-attention groups keys and queries.")
@click.option(
    "--ulysses", type=click.IntRange(min=2), default=None, metavar="N",
    help="Run context-parallel on N ranks (Ulysses, diffusers' engine): under torchrun unless COMMAND is torchrun.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(patch_names: tuple[str, ...], record_path: str | None, record_groups: str, ulysses: int | None,
        command: tuple[str, ...]) -> int:
    """Run COMMAND, an unchanged program, so that every CogVideoXTransformer3DModel it or any of its Python child
    processes builds gets the patches (and, with --record-attention, has its attention recorded: the first model to
    FILE.json, any other to FILE.PID-N.json; written when the program exits). Which patches went onto which model is
    said on stderr; the program's exit status is passed through.

    With --ulysses N every model built runs context-parallel over N ranks (the process group is set up for it, each
    rank on its own GPU); every rank computes the whole output, so the script must draw the same noise on each
    (a seeded generator).

    \b
    Examples:
      cogsurgeon run --patch causal-attention -- python test.py
      cogsurgeon run --patch frame-causal-attention --patch attention-mask -- accelerate launch train.py
      cogsurgeon run --patch causal-attention -- torchrun --nproc_per_node 2 sample.py
      cogsurgeon run --record-attention run.json -- python sample.py   # then: cogsurgeon attention show run.json
      cogsurgeon run --ulysses 4 --patch frame-causal-attention -- python sample.py   # 4 GPUs, one video
    """
    from cogsurgeon.patches.launcher import run_patched

    record = None if record_path is None and record_groups == "frames" else _record_request(record_path, record_groups)
    outcome = run_patched(command, patch_names, record, ulysses)
    for path in outcome.recordings:
        click.echo(f"cogsurgeon run: attention recorded in {path}", err=True)
    if not outcome.models_built:
        click.echo("cogsurgeon run: the program ended without building a CogVideoXTransformer3DModel: nothing was "
                   "patched", err=True)
    return outcome.exit_status


def _record_request(path: str | None, groups: str):
    """`--record-attention FILE.json` (in a folder that exists) and `--record-groups`, checked before the program
    starts."""
    from pathlib import Path

    from cogsurgeon.inspector.attention_recording import RecordingError
    from cogsurgeon.inspector.attention_xray import parse_groups
    from cogsurgeon.patches.launcher import RecordRequest

    if path is None:
        raise RecordingError("--record-groups needs --record-attention FILE.json")
    target = Path(path).expanduser().absolute()
    if target.suffix != ".json":
        raise RecordingError(f"--record-attention {path}: a recording is saved as FILE.json")
    if not target.parent.is_dir():
        raise RecordingError(f"--record-attention {path}: folder {target.parent} does not exist")
    return RecordRequest(target, str(parse_groups(groups)))


__all__ = [
    "patch", "run",
]
