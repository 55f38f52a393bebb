"""`cogsurgeon plan`: the memory planner of `inspector.plan` on the command line, as JSON or a readable summary.

Top-level imports stay light (click only): the CLI imports this module on every start.
"""

from __future__ import annotations

import click

from cogsurgeon.inspector.cli.output import DTYPE_CHOICE, POSITIVE, print_json, progress_line, stdout_console


@click.command(short_help="Will it fit? The peak GPU memory of inference or a training step, without a GPU.")
@click.argument("model", required=False)
@click.option("--frames", type=POSITIVE, help="Video frames (4k+1: 49, 81). Default: the model's.")
@click.option("--height", type=POSITIVE, help="Video height in pixels. Default: the model's.")
@click.option("--width", type=POSITIVE, help="Video width in pixels. Default: the model's.")
@click.option("--batch", default=2, show_default=True, type=POSITIVE,
              help="The transformer's batch: 2 is one video with classifier-free guidance.")
@click.option("--dtype", type=DTYPE_CHOICE,
              help="Weights' dtype. Default: as the model is stored (bfloat16 for the published ones, float32 tiny).")
@click.option("--train", metavar="lora:RANK|full", help="Plan one training step instead of inference.")
@click.option("--mixed-precision", metavar="no|fp16|bf16",
              help="Training under accelerate's mixed precision (autocast around the forward). Default with --train: "
                   "bf16, what the diffusers script, cogvideox-factory and VideoX-Fun run.")
@click.option("--lora-dtype", metavar="auto|fp32|bf16|fp16",
              help="The LoRA adapters' dtype: auto leaves PEFT's (the base layers'); fp32 as cast_training_params.")
@click.option("--trainer", metavar="NAME",
              help="Plan training as this trainer sets it up (dtype, mixed precision, adapters, rank, optimizer, "
                   "checkpointing; with --train full, its full finetune: DeepSpeed ZeRO stage and GPUs where its "
                   "launch uses them): cogvideo-finetune, diffusers-scripts, cogvideox-factory, finetrainers, "
                   "cogkit, videox-fun. Flags given beside it override it.")
@click.option("--checkpointing", is_flag=True,
              help="Gradient checkpointing (diffusers' enable_gradient_checkpointing).")
@click.option("--patch", "patch_names", multiple=True, metavar="NAME",
              help="Plan with this patch applied (repeatable).")
@click.option("--vae", is_flag=True, help="Add the VAE decode of the latents (transformer still on the GPU).")
@click.option("--tiling", is_flag=True, help="Decode tiled, as diffusers' vae.enable_tiling().")
@click.option("--gpu-memory", metavar="SIZE", help="A card's memory (80GiB, 24G): say whether it fits and what would.")
@click.option("--ulysses", default=1, type=click.IntRange(min=1), metavar="N",
              help="Context-parallel over N GPUs (cogsurgeon.parallel, Ulysses): the peak of one of them.")
@click.option("--zero", type=int, metavar="0|1|2|3",
              help="--train full under DeepSpeed ZeRO: 1 shards the optimizer state, 2 also the gradients, 3 also "
                   "the weights, over --gpus; the peak of one GPU. 0: no DeepSpeed. Default: the trainer's, else 0.")
@click.option("--gpus", type=int, metavar="N",
              help="The GPUs ZeRO shards over (data parallel). Default: the trainer's, else 1.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"peak_bytes", "breakdown", "peak_at", "fits", "suggestions", ...} as JSON.')
def plan(model: str | None, frames: int | None, height: int | None, width: int | None, batch: int,
         dtype: str | None, train: str | None, mixed_precision: str | None, lora_dtype: str | None,
         trainer: str | None, checkpointing: bool, patch_names: tuple[str, ...], vae: bool,
         tiling: bool, gpu_memory: str | None, ulysses: int, zero: int | None, gpus: int | None,
         as_json: bool) -> None:
    """Plan the peak GPU memory of a run of MODEL at a video size, before running it.

    The run is diffusers' own code on the meta device (no weights, no compute), with every allocation booked as
    PyTorch's CUDA allocator books it (512-byte blocks, freed when the tensor dies) and attention counted by the
    kernel the GPU runs (flash; memory-efficient with a mask). The peak compares with
    torch.cuda.max_memory_allocated(); the CUDA context comes on top.

    MODEL: see `cogsurgeon modules --help`.

    \b
    Examples:
      cogsurgeon plan                                          # cogvideox-5b-i2v, 49×480×720, batch 2, inference
      cogsurgeon plan cogvideox1.5-5b --frames 81 --height 768 --width 1360
      cogsurgeon plan cogvideox-5b --train lora:128 --batch 1 --checkpointing --gpu-memory 24GiB
      cogsurgeon plan cogvideox-5b --vae --tiling --json | jq .breakdown
      cogsurgeon plan cogvideox-2b --train lora:128 --dtype fp16 --mixed-precision fp16 --lora-dtype fp32 --batch 1
      cogsurgeon plan cogvideox1.5-5b --trainer cogvideo-finetune --frames 81 --height 768 --width 1360 --batch 1
      cogsurgeon plan cogvideox1.5-5b --frames 81 --height 768 --width 1360 --ulysses 4   # per GPU of 4
      cogsurgeon plan cogvideox-5b --trainer cogvideo-finetune --train full --batch 1   # its SFT: ZeRO-2, 8 GPUs
      cogsurgeon plan cogvideox-5b --train full --zero 3 --gpus 8 --checkpointing --batch 1
    """
    from cogsurgeon.inspector.cli.trace import _known_config, check_traceable
    from cogsurgeon.inspector.geometry import default_video_size
    from cogsurgeon.inspector.plan import (
        PlanError,
        check_precision_choice,
        check_zero_choice,
        parse_memory_size,
        parse_train,
        plan_memory,
        trainer_preset,
    )

    train_mode = parse_train(train)  # flags refused before paying for torch and the model
    check_precision_choice(mixed_precision, lora_dtype)
    check_zero_choice(zero, gpus)
    if zero and ulysses > 1:
        raise PlanError("--zero and --ulysses together are not planned (context parallelism beside ZeRO's "
                        "sharding): drop one")
    if trainer is not None:
        trainer_preset(trainer)
    card = parse_memory_size(gpu_memory) if gpu_memory is not None else None
    config = _known_config(model)
    defaults = default_video_size(config) if config is not None else (49, 480, 720)  # a folder: CogVideoX's size
    frames, height, width = (given or default for given, default in zip((frames, height, width), defaults))
    if config is not None:
        check_traceable(config, frames, height, width, batch, what="plan")
    with progress_line() as say:
        result = plan_memory(model, frames=frames, height=height, width=width, batch=batch,
                             dtype=dtype, train=train_mode, checkpointing=checkpointing,
                             patches=patch_names, vae=vae, tiling=tiling, gpu_memory=card,
                             mixed_precision=mixed_precision, lora_dtype=lora_dtype, trainer=trainer,
                             ulysses=ulysses, zero=zero, gpus=gpus, progress=say)
    if as_json:
        print_json(result.to_json())
        return
    _print_summary(result)


def _print_summary(result) -> None:
    from rich.table import Table

    from cogsurgeon.inspector.trace import format_bytes

    console = stdout_console()
    settings, peak = result.settings, result.peak
    mode = f"training step ({settings.train.label()})" if settings.train else "inference"
    switches = [name for name, on in (("checkpointing", settings.checkpointing), ("vae decode", settings.vae),
                                      ("tiling", settings.tiling)) if on]
    switches += [f"patch {name}" for name in settings.patches]
    switches += [f"per GPU of {settings.ulysses}, Ulysses"] if settings.ulysses > 1 else []
    switches += [f"per GPU of {settings.zero.gpus}, DeepSpeed ZeRO-{settings.zero.stage}"] if settings.zero else []
    console.print(
        f"[bold]{settings.model}[/bold] {mode} at {settings.frames}×{settings.height}×{settings.width}, batch "
        f"{settings.batch}, {settings.dtype}" + (f" ({', '.join(switches)})" if switches else "")
    )
    if settings.train:
        precision = (f"DeepSpeed {settings.dtype}, no autocast, fp32 master weights" if settings.zero else
                     f"mixed precision {settings.mixed_precision}, LoRA dtype {settings.lora_dtype}")
        console.print(f"{precision}, {settings.optimizer}"
                      + (f": {settings.trainer}'s set-up" if settings.trainer else ""))
    console.print(f"peak: [bold]{format_bytes(peak.peak_bytes)}[/bold] ({peak.peak_bytes:,} bytes) in "
                  f"{peak.phase}, at {peak.peak_at}")
    table = Table(title="live at the peak", header_style="bold")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    for name, value in peak.breakdown.items():
        if value:
            table.add_row(name, format_bytes(value))
    console.print(table)
    if len(result.phases) > 1:
        for phase in result.phases:
            console.print(f"  {phase.phase}: {format_bytes(phase.peak_bytes)} at {phase.peak_at}")
    if result.fits is not None:
        verdict = "[green]fits[/green]" if result.fits else "[red]does not fit[/red]"
        console.print(f"{format_bytes(result.gpu_memory)} card: {verdict}")
        for suggestion in result.suggestions:
            outcome = "fits" if suggestion.fits else "still too large"
            console.print(f"  with {suggestion.switch}: {format_bytes(suggestion.peak_bytes)} ({outcome})")
    for note in result.notes:
        console.print(f"[dim]note: {note}[/dim]")


__all__ = [
    "plan",
]
