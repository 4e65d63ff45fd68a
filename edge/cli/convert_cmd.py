"""`qwen-edge convert`: HF checkpoint (pinned Hub revision or local folder) → F32 / Q8_0 / Q4_K_M GGUF."""
from __future__ import annotations

from pathlib import Path

import click

from edge.settings import DEFAULT_REPO, DEFAULT_REVISION


def _types(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    from edge.convert.pipeline import OUTPUT_TYPES

    chosen = tuple(t.strip().lower() for t in value.split(",") if t.strip())
    unknown = [t for t in chosen if t not in OUTPUT_TYPES]
    if unknown or not chosen:
        raise click.BadParameter(f"{','.join(unknown) or 'empty'}; choose from {','.join(OUTPUT_TYPES)}")
    return tuple(t for t in OUTPUT_TYPES if t in chosen)


@click.command()
@click.option("--repo", default=DEFAULT_REPO, show_default=True, help="Hugging Face repo to download.")
@click.option("--revision", default=DEFAULT_REVISION, show_default=True, help="Pinned commit of --repo.")
@click.option("--from-dir", type=click.Path(path_type=Path), default=None,
              help="Convert this local HF folder instead of downloading.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (GGUF files + manifest.json); default: the configured model.dir.")
@click.option("--types", default="f32,q8_0,q4_k_m", show_default=True, callback=_types,
              help="Comma-separated outputs: f32, q8_0, q4_k_m.")
@click.option("--name", default=None, help="File name stem (default: repo or folder name, lower case).")
@click.option("--threads", default=0, show_default=True, help="Quantizer threads; 0 = all cores.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def convert(repo: str, revision: str, from_dir: Path | None, out_dir: Path | None, types: tuple[str, ...],
            name: str | None, threads: int, no_progress: bool) -> None:
    """Convert Qwen2-family safetensors to GGUF (F32, then Q8_0 / Q4_K_M with llama.cpp)."""
    from edge.cli.common import friendly_errors, settings_from
    from edge.convert.pipeline import ConvertRequest, run_conversion

    if out_dir is None:
        out_dir = settings_from(None).model.dir

    request = ConvertRequest(out_dir=out_dir, types=types, name=name, from_dir=from_dir, repo=repo,
                             revision=revision, n_threads=threads, progress=not no_progress)
    with friendly_errors(one_line=True):
        result = run_conversion(request)
    for entry in result.skipped:
        click.echo(f"up to date  {out_dir / entry.file}  ({entry.type}, {entry.size / 1e6:.1f} MB)")
    for entry in result.written:
        click.echo(f"written     {out_dir / entry.file}  ({entry.type}, {entry.size / 1e6:.1f} MB, "
                   f"{entry.tensor_count} tensors, sha256 {entry.sha256[:12]})")
    click.echo(f"manifest    {result.manifest}")
