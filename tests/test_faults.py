"""Faults (issue 5): conversion killed with SIGKILL, disk full / write errors during conversion and
bulk classification, corrupt model files handed to the CLI and the daemon.

Every case runs the real command in a child process. What must hold:
- a file under a final name is always complete (watched while the child runs, checked again after);
- a re-run after any interruption produces byte-identical outputs to an uninterrupted run;
- a write error is one clear line and a non-zero exit, and what was complete stays intact;
- a bad model file is refused with one line naming it: exit code 1, never a signal (segfault).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge.model.gguf_check import ModelFileError, check_gguf
from robust_helpers import ROOT, child_env, cli_cmd, kill_tree, one_line_error, run_cli
from serving_helpers import free_port
from tiny_checkpoint import TinySpec, build_tiny_checkpoint

NAME = "m"
TYPES = ("f32", "q8_0", "q4_k_m")


def sha256(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def final_name(kind: str) -> str:
    return f"{NAME}-{kind}.gguf"


def temp_of(folder: Path, kind: str) -> list[Path]:
    return list(folder.glob(f".{final_name(kind)}.tmp-*"))


def convert_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return cli_cmd("convert", "--from-dir", str(src), "--out", str(out), "--name", NAME, "--no-progress", *extra)


def limit_file_size(limit: int):
    """preexec_fn: files larger than `limit` bytes cannot be written; writes fail with EFBIG."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@dataclass
class Reference:
    src: Path
    folder: Path
    sha: dict[str, str]
    size: dict[str, int]
    manifest: dict


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Reference:
    """A checkpoint big enough (52 MB F32) that a conversion lasts a few seconds, and the outputs
    of one uninterrupted conversion of it."""
    from edge.convert.pipeline import ConvertRequest, run_conversion

    src = build_tiny_checkpoint(tmp_path_factory.mktemp("medium_hf"), TinySpec(layers=12, intermediate=1024)).path
    out = tmp_path_factory.mktemp("medium_ref")
    run_conversion(ConvertRequest(out_dir=out, from_dir=src, name=NAME))
    names = [final_name(k) for k in TYPES]
    return Reference(src, out, {n: sha256(out / n) for n in names}, {n: (out / n).stat().st_size for n in names},
                     json.loads((out / "manifest.json").read_text()))


# -- watching a conversion ------------------------------------------------------------------------
@dataclass
class Watch:
    """Everything seen under a final name while a child ran: each file was opened at first sight,
    so its content can be checked afterwards even if it was replaced in between."""
    ref: Reference
    folder: Path
    opened: dict[tuple[str, int], int] = field(default_factory=dict)   # (name, inode) -> fd
    problems: list[str] = field(default_factory=list)

    def poll(self) -> None:
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name == "manifest.json":
                try:
                    json.loads(Path(entry.path).read_text())
                except FileNotFoundError:
                    pass
                except ValueError as exc:
                    self.problems.append(f"manifest.json seen unreadable: {exc}")
                continue
            expected = self.ref.size.get(entry.name)
            if expected is None:
                self.problems.append(f"unexpected final name {entry.name}")
            elif st.st_size != expected:
                self.problems.append(f"{entry.name} seen with {st.st_size} of {expected} bytes")
            key = (entry.name, st.st_ino)
            if key not in self.opened:
                try:
                    self.opened[key] = os.open(entry.path, os.O_RDONLY)
                except FileNotFoundError:
                    pass

    def verify_and_close(self) -> None:
        for (name, _), fd in self.opened.items():
            try:
                fd_path = f"/proc/self/fd/{fd}"
                check_gguf(fd_path)
                if sha256(fd_path) != self.ref.sha[name]:
                    self.problems.append(f"{name} was visible with other content than the final file")
            except ModelFileError as exc:
                self.problems.append(f"{name} was visible incomplete: {exc}")
            finally:
                os.close(fd)
        self.opened.clear()


def run_until(cmd: list[str], watch: Watch, trigger, timeout: float = 180) -> tuple[bool, int]:
    """Run `cmd`, polling the folder; SIGKILL it when `trigger(folder)` holds.
    Returns (killed while still running, return code)."""
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=child_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout
    killed = False
    try:
        while proc.poll() is None:
            watch.poll()
            if trigger is not None and trigger(watch.folder):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            assert time.monotonic() < deadline, "conversion did not finish in time"
            time.sleep(0.003)
        proc.wait(timeout=30)
        watch.poll()
    finally:
        kill_tree(proc)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        err.close()
    if not killed:
        assert proc.returncode == 0, stderr[-2000:]
    return killed and proc.returncode == -signal.SIGKILL, proc.returncode


def assert_same_as_reference(folder: Path, ref: Reference) -> None:
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([*ref.sha, "manifest.json"]), names  # no temporaries left behind
    for name, digest in ref.sha.items():
        assert sha256(folder / name) == digest, f"{name} differs from an uninterrupted run"
    assert json.loads((folder / "manifest.json").read_text()) == ref.manifest


def _temp_half_written(kind: str, ref: Reference):
    def trigger(folder: Path) -> bool:
        return any(p.exists() and p.stat().st_size > ref.size[final_name(kind)] // 2 for p in temp_of(folder, kind))
    return trigger


def _temp_exists(kind: str):
    return lambda folder: bool(temp_of(folder, kind))


def _final_exists(kind: str):
    return lambda folder: (folder / final_name(kind)).exists()


KILL_POINTS = {
    "f32 temp half written": lambda ref: _temp_half_written("f32", ref),
    "f32 renamed": lambda ref: _final_exists("f32"),
    "q8_0 temp created": lambda ref: _temp_exists("q8_0"),
    "q8_0 renamed": lambda ref: _final_exists("q8_0"),
    "q4_k_m temp created": lambda ref: _temp_exists("q4_k_m"),
}


def test_conversion_killed_again_and_again_then_rerun_is_byte_identical(medium, tmp_path):
    """One output folder, a run SIGKILLed at each point in turn (as repeated power cuts would),
    then a run to the end: the outputs equal an uninterrupted run's, byte for byte."""
    out = tmp_path / "out"
    watch = Watch(medium, out)
    killed_mid_run = []
    for point, make in KILL_POINTS.items():
        if run_until(convert_cmd(medium.src, out), watch, make(medium))[0]:
            killed_mid_run.append(point)
    run_until(convert_cmd(medium.src, out), watch, None)
    watch.verify_and_close()
    assert watch.problems == []
    assert len(killed_mid_run) >= 3, f"too few kills landed mid-run: {killed_mid_run}"
    assert_same_as_reference(out, medium)


@pytest.mark.slow
@pytest.mark.parametrize("point", [*KILL_POINTS, "after 0.5 s", "after 1.5 s", "after 2.5 s"])
def test_conversion_killed_once_then_rerun_is_byte_identical(medium, tmp_path, point):
    out = tmp_path / "out"
    watch = Watch(medium, out)
    if point.startswith("after"):
        t0 = time.monotonic()
        delay = float(point.split()[1])
        trigger = lambda folder: time.monotonic() - t0 > delay  # noqa: E731
    else:
        trigger = KILL_POINTS[point](medium)
    run_until(convert_cmd(medium.src, out), watch, trigger)
    run_until(convert_cmd(medium.src, out), watch, None)
    watch.verify_and_close()
    assert watch.problems == []
    assert_same_as_reference(out, medium)


# -- disk full / write errors during conversion ----------------------------------------------------
def _convert_limited(ref: Reference, out: Path, limit: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(convert_cmd(ref.src, out, *extra), capture_output=True, text=True, timeout=180,
                          env=child_env(), cwd=ROOT, preexec_fn=limit_file_size(limit))


def _no_incomplete_final_files(out: Path, ref: Reference) -> list[str]:
    finals = sorted(p.name for p in out.iterdir() if p.name.endswith(".gguf") and not p.name.startswith("."))
    for name in finals:
        assert sha256(out / name) == ref.sha[name], f"{name} is under its final name but incomplete"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporaries left behind"
    return finals


def test_write_error_while_writing_the_f32_file(medium, tmp_path):
    out = tmp_path / "out"
    proc = _convert_limited(medium, out, 20 << 20)
    assert proc.returncode == 1, proc.stderr
    line = one_line_error(proc.stderr)
    assert f"cannot write {out / final_name('f32')}" in line and "disk full" in line
    assert _no_incomplete_final_files(out, medium) == []


def test_write_error_in_the_quantizer_keeps_the_finished_f32_intact(medium, tmp_path):
    from edge.convert.pipeline import ConvertRequest, run_conversion

    out = tmp_path / "out"
    run_conversion(ConvertRequest(out_dir=out, from_dir=medium.src, name=NAME, types=("f32",)))
    before = (out / final_name("f32")).stat().st_mtime_ns
    # q8_0 (14 MB) cannot be written, the F32 (52 MB) is only read
    proc = _convert_limited(medium, out, 10 << 20)
    assert proc.returncode == 1, proc.stderr
    line = one_line_error(proc.stderr)
    assert "could not quantize to q8_0" in line and "disk full" in line
    assert _no_incomplete_final_files(out, medium) == [final_name("f32")]
    assert (out / final_name("f32")).stat().st_mtime_ns == before
    assert [f["type"] for f in json.loads((out / "manifest.json").read_text())["files"]] == ["f32"]
    # room again: the re-run completes and matches an uninterrupted run
    assert run_cli("convert", "--from-dir", str(medium.src), "--out", str(out), "--name", NAME,
                   "--no-progress").returncode == 0
    assert_same_as_reference(out, medium)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 6 MB tmpfs: a real ENOSPC. Needs root and a kernel that lets us mount; skips otherwise."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_on_a_real_filesystem(medium, small_tmpfs):
    out = small_tmpfs / "out"
    proc = subprocess.run(convert_cmd(medium.src, out), capture_output=True, text=True, timeout=180,
                          env=child_env(), cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    line = one_line_error(proc.stderr)
    assert "No space left on device" in line or "disk full" in line
    assert _no_incomplete_final_files(out, medium) == []
    assert shutil.disk_usage(small_tmpfs).used < 1 << 20, "the partial temporary was not removed"


# -- disk full during bulk classification ----------------------------------------------------------
def _bulk_rows(path: Path) -> list[int]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "a partial row under the results file's name"
    lines = data.decode("utf-8").split("\n")[:-1]
    assert lines[0].startswith("row\t")
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 6 and r[1] in ("positive", "negative") for r in rows)
    return [int(r[0]) for r in rows]


def test_bulk_classification_write_error_keeps_whole_rows_and_resumes(tiny_gguf, tmp_path):
    texts = [f"review {i}: {'lovely, great' if i % 2 else 'terrible, awful'} stuff" for i in range(60)]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "out.tsv"
    config = tmp_path / "tiny.toml"
    config.write_text(f"[model]\nn_ctx = 4096\nn_batch = 256\nn_threads = 2\n[prompts]\nmax_text_tokens = 96\n"
                      f"dir = {json.dumps(str(ROOT / 'prompts'))}\n")
    args = ("classify", "--file", str(src), "--out", str(out), "--model", str(tiny_gguf), "--config", str(config))
    proc = subprocess.run(cli_cmd(*args), capture_output=True, text=True, timeout=180, env=child_env(), cwd=ROOT,
                          preexec_fn=limit_file_size(1600))
    assert proc.returncode == 1, proc.stderr
    line = one_line_error(proc.stderr)
    assert f"cannot write {out}" in line and "re-run resumes" in line
    done = _bulk_rows(out)
    assert done == list(range(len(done))) and 8 <= len(done) < len(texts)
    kept = out.read_bytes()
    proc = run_cli(*args, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert _bulk_rows(out) == list(range(len(texts)))
    assert out.read_bytes().startswith(kept)  # rows already written were not rewritten


# -- corrupt model files ---------------------------------------------------------------------------
def _kv_value_at(data: bytes, key: str) -> int:
    raw = key.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw) + 4  # past the value type


def _tensor_field_at(data: bytes, name: str) -> int:
    """Offset of a tensor info's n_dims field."""
    raw = name.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def _patched(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


def corrupt_variants(good: Path) -> dict[str, bytes]:
    data = good.read_bytes()
    info = check_gguf(good)
    end_of_data = info.data_offset + max(t.offset + t.nbytes for t in info.tensors)
    emb = _tensor_field_at(data, "token_embd.weight")            # n_dims u32, 2 x u64, type u32, offset u64
    return {
        "truncated in the header": data[:200],
        "truncated in the vocabulary": data[: info.data_offset // 2],
        "truncated in the tensor data": data[: (info.data_offset + end_of_data) // 2],
        "one byte short": data[: end_of_data - 1],
        "wrong magic": _patched(data, 0, b"GGML"),
        "not a model": b'{"this": "is json"}\n' * 100,
        "wrong architecture": _patched(data, _kv_value_at(data, "general.architecture") + 8, b"llama"),
        "absurd tensor count": _patched(data, 8, struct.pack("<Q", 1 << 40)),
        "absurd metadata count": _patched(data, 16, struct.pack("<Q", 1 << 40)),
        "absurd tensor size": _patched(data, emb + 4 + 8, struct.pack("<Q", 1 << 40)),
        "tensor past the end of the file": _patched(data, emb + 4 + 16 + 4, struct.pack("<Q", len(data))),
        "header lies about the layer count": _patched(data, _kv_value_at(data, "qwen2.block_count"),
                                                       struct.pack("<I", 3)),
        "header lies about the width": _patched(data, _kv_value_at(data, "qwen2.embedding_length"),
                                                struct.pack("<I", 128)),
    }


@pytest.fixture(scope="module")
def corrupt_models(tiny_gguf, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("corrupt")
    out = {}
    for i, (case, data) in enumerate(corrupt_variants(tiny_gguf).items()):
        out[case] = folder / f"bad{i}.gguf"
        out[case].write_bytes(data)
    return out


def _refusals(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    def one(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=child_env(), cwd=ROOT)
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(commands, pool.map(one, commands.values())))


def _refusal_line(stderr: str) -> str:
    """The CLI's one 'Error:' line, or for the daemon (which refuses from its loader thread after
    binding) its one ERROR log line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    if "Error:" in stderr:
        return one_line_error(stderr)
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _check_refusals(results: dict[str, subprocess.CompletedProcess], models: dict[str, Path]) -> None:
    failures = []
    for case, proc in results.items():
        if proc.returncode != 1:
            failures.append(f"{case}: exit code {proc.returncode} (negative = killed by a signal)\n{proc.stderr[-800:]}")
            continue
        try:
            line = _refusal_line(proc.stderr)
        except AssertionError as exc:
            failures.append(f"{case}: {exc}")
            continue
        if models[case].name not in line:
            failures.append(f"{case}: the message does not name the file: {line}")
    assert not failures, "\n".join(failures)


CLI_CASES = ("truncated in the tensor data", "one byte short", "wrong magic", "wrong architecture",
             "absurd tensor count", "tensor past the end of the file", "header lies about the layer count")


@pytest.mark.parametrize("cases", [CLI_CASES, pytest.param(None, marks=pytest.mark.slow)], ids=["some", "all"])
def test_cli_refuses_corrupt_model_files(corrupt_models, cases):
    chosen = {c: p for c, p in corrupt_models.items() if cases is None or c in cases}
    results = _refusals({case: cli_cmd("classify", "hello", "--model", str(path)) for case, path in chosen.items()})
    _check_refusals(results, chosen)


SERVE_CASES = ("truncated in the tensor data", "wrong architecture", "header lies about the layer count")


@pytest.mark.parametrize("cases", [SERVE_CASES, pytest.param(None, marks=pytest.mark.slow)], ids=["some", "all"])
def test_daemon_refuses_corrupt_model_files(corrupt_models, cases):
    chosen = {c: p for c, p in corrupt_models.items() if cases is None or c in cases}
    results = _refusals({case: cli_cmd("serve", "--model", str(path), "--port", str(free_port()))
                         for case, path in chosen.items()})
    _check_refusals(results, chosen)
