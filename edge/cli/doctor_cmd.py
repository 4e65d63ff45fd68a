"""`qwen-edge doctor`: parse, call `edge.doctor.run_doctor`, print its report.

Exit code 1 when something is wrong: unsafe build, corrupt file, checksum mismatch.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from edge.cli.common import setting_option, settings_from
from edge.doctor import run_doctor

MIB = 1 << 20


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.0f} MiB"


MARK = {True: "ok", False: "FAIL", None: "?"}
CHECKSUM_TEXT = {None: "not in manifest", True: "matches manifest", False: "MISMATCH with manifest"}


def _format_model(m: dict) -> list[str]:
    lines = [f"  [{MARK[m['ok']]}] {m['path']}"]
    if m["error"]:
        return lines + [f"        {m['error']}"]
    check = CHECKSUM_TEXT[m["checksum_ok"]]
    if m["sha256"] is None and m["expected_sha256"] and m["checksum_ok"] is None:
        check = "size matches manifest (sha256 skipped)"
    lines.append(f"        {m['file_type']}, {_mb(m['size_bytes'])}, sha256 {(m['sha256'] or '-')[:16]}… {check}")
    if "estimate" in m:
        lines.append(f"        memory: {m['fit_message']}")
    measured = m.get("measured")
    if measured and "rss_bytes" in measured:
        lines.append(f"        measured RSS {measured['rss_bytes'] / 1e6:.0f} MB vs estimate "
                     f"{measured['estimate_bare_bytes'] / 1e6:.0f} MB (same process, without the daemon's "
                     f"own modules): {measured['error']:+.1%}")
    elif measured:
        lines.append(f"        measure failed: {measured['error_message']}")
    return lines


def format_report(report: dict) -> str:
    cpu, mem = report["cpu"], report["memory"]
    amx = "advertised" if any(f.startswith("amx") for f in cpu["features"]) else "not advertised"
    limit = _mb(mem["cgroup_limit_bytes"]) if mem["cgroup_limit_bytes"] else "none"
    lines = [f"CPU       {cpu['machine']} {cpu['model_name']}",
             f"          features: {' '.join(cpu['features']) or '-'}; AMX {amx}",
             f"llama.cpp {' '.join(k for k, v in cpu['build'].items() if v == '1') or '-'}",
             f"build     [{MARK[cpu['safe']]}] {cpu['message']}",
             f"memory    total {_mb(mem['total_bytes'])}, available {_mb(mem['available_bytes'])}, "
             f"cgroup limit {limit}, budget {_mb(mem['effective_budget_bytes'])} "
             f"(memory.budget_mb {mem['budget_setting_mb']})",
             f"models    {report['model_dir']}" + ("" if report["models"] else ": no GGUF files")]
    for m in report["models"]:
        lines += _format_model(m)
    lines.append("result    " + ("all good" if report["ok"] else "PROBLEMS FOUND (see FAIL above)"))
    return "\n".join(lines)


@click.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML configuration file.")
@click.option("--model", type=click.Path(path_type=Path), help="Also check this GGUF (and probe with it).")
@setting_option("model.dir", "--model-dir")
@click.option("--measure", is_flag=True, help="Load each model in a child process, fill the context, compare RSS.")
@click.option("--no-checksum", is_flag=True, help="Skip sha256 of the model files.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--probe-timeout", type=float, default=120.0, show_default=True, help="Seconds for the build probe.")
def doctor(config_file: Path | None, model: Path | None, model_dir: Path | None, measure: bool,
           no_checksum: bool, as_json: bool, probe_timeout: float) -> None:
    """Check CPU/llama.cpp build safety, memory, model files and checksums."""
    settings = settings_from(config_file, model={"dir": model_dir})
    report = run_doctor(settings, model=model, measure=measure, probe_timeout_s=probe_timeout,
                        checksums=not no_checksum)
    click.echo(json.dumps(report, indent=2, default=str) if as_json else format_report(report))
    if not report["ok"]:
        raise SystemExit(1)
