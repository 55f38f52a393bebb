"""`cogsurgeon doctor`: the probes of `inspector.doctor` on the command line, as JSON or a readable table.

Top-level imports stay light (click only): the CLI imports this module on every start.
"""

from __future__ import annotations

import sys

import click

from cogsurgeon.inspector.cli.output import print_json, progress_line, stdout_console


@click.command(short_help="Probe the installed diffusers and peft for the known CogVideoX pitfalls.")
@click.option("--check", "checks", multiple=True, metavar="ID",
              help="Run only this check (repeatable): mask-pad-length, fused-processor-text-length, "
                   "block-drops-attention-kwargs, attention-backend-ignored, lora-alpha-lost, peft-local-path-hub.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"findings": [{"id", "status", "detail", "fix"}]} as JSON.')
def doctor(checks: tuple[str, ...], as_json: bool) -> None:
    """Probe the installed diffusers and peft for the known CogVideoX pitfalls.

    Every check is a small experiment on the installed libraries (a tiny model on the CPU, a real LoRA save and
    reload, a PEFT load with the network cut off), never a lookup of version numbers:

    \b
      mask-pad-length               prepare_attention_mask pads by the target length, not the missing length
      fused-processor-text-length   the fused processor prepares masks with the text length
      block-drops-attention-kwargs  CogVideoXBlock does not pass attention_kwargs to attention
      attention-backend-ignored     set_attention_backend does not reach the CogVideoX processor
      lora-alpha-lost               a LoRA saved without metadata reloads at alpha = rank
      peft-local-path-hub           PEFT goes to the Hub for a local folder without adapter_config.json

    Each finding is "present" or "absent", with what the experiment saw and, when present, the cogsurgeon command
    (or line of code) that fixes or avoids the pitfall. Takes under a minute (the PEFT check starts one Python process).

    Exit status: 0 when every check ran (present pitfalls are information about your installation, not a
    failure of the run); 1 when a check could not run (status "error"; please report it); 2 for bad usage.

    \b
    Examples:
      cogsurgeon doctor
      cogsurgeon doctor --json | jq '.findings[] | select(.status == "present") | .fix'
      cogsurgeon doctor --check lora-alpha-lost
    """
    from cogsurgeon.inspector.doctor import run_doctor

    with progress_line() as say:
        findings = run_doctor(checks or None, progress=lambda probe: say(f"checking {probe.id}…"))
    if as_json:
        print_json({"findings": [finding.to_json() for finding in findings]})
    else:
        _print_table(findings)
    if any(finding.status == "error" for finding in findings):
        sys.exit(1)


def _print_table(findings) -> None:
    from rich.table import Table

    console = stdout_console()
    styles = {"present": "bold yellow", "absent": "green", "error": "bold red"}
    table = Table(title="cogsurgeon doctor", header_style="bold", show_lines=True)
    for column in ("check", "status", "what the experiment saw", "fix or avoid with"):
        table.add_column(column, overflow="fold")
    for finding in findings:
        status = f"[{styles[finding.status]}]{finding.status}[/]"
        table.add_row(finding.id, status, finding.detail, finding.fix or "")
    console.print(table)


__all__ = [
    "doctor",
]
