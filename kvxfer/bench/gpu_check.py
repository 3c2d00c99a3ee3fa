"""`make gpu-check` (`python -m kvxfer.bench.gpu_check --out DIR`): the one-command GPU validation.

Runs the stages below in order, each as subprocesses whose output goes to DIR/logs/NN-name.log,
with a time check before each: a stage starts only if its estimate fits in what is left of
`--budget-s`, and is stopped (its whole process group) at its limit or when the budget runs
out. Stages that need CUDA report "skipped: no GPU" on a host without one. DIR/summary.json
and DIR/summary.md say what ran, how long it took, its status and every JSON result line its
commands printed. The exit status is 0 when no stage failed or timed out.

Standard library only: it runs before the carried wheels (`make gpu-wheels`) are installed,
which is its first step (into `--site`, put first on the stages' PYTHONPATH).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 5.0
RESERVE_S = 5.0  # kept back for the summary after the last stage


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    commands: tuple[str, ...]  # bash command lines, run in order; the first failure ends the stage
    estimate_s: float  # started only when at least this much budget is left
    limit_s: float  # stopped after this long
    needs_cuda: bool = True
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class StageResult:
    name: str
    title: str
    status: str  # passed | failed | timed out | skipped
    reason: str = ""
    seconds: float = 0.0
    log: str = ""
    results: list[dict] = field(default_factory=list)  # JSON objects the commands printed


def stages(py: str, quick: bool = False) -> list[Stage]:
    """The check's stages; `py` runs Python with kvxfer importable. `quick` shrinks the
    workloads (a smoke run of the orchestration, not a measurement)."""
    q = shlex.quote(py)
    bench = f"{q} -m kvxfer.entrypoints.cli bench"
    gpu = f"{q} -m kvxfer.bench.gpu_stages"
    transfers = [
        f"{bench} transfer --shape qwen3-0.6b-shape --device cuda --tokens {tokens} "
        f"--prefill-tp {tp} --decode-tp {tp} --iterations 3 --json"
        for tokens in (4096, 32768) for tp in (1, 2)
    ]
    engine = (f"{bench} engine --preset qwen3-0.6b-shape --num-prompts 256 --input-len 100-1024 "
              f"--output-len 100-1024 --device cuda --cuda-graphs --json")
    accuracy = f"PYTHON={q} DEVICE=cuda GPU_SHARING=1 NUM_PROMPTS=60 HEALTH_TIMEOUT=120 bash integration/run_accuracy_test.sh"
    return [
        Stage("env", "environment: GPU, versions, UCX transports, nixl imported after CUDA init", (
            "nvidia-smi || echo 'nvidia-smi: not available'",
            f"{gpu} env",
        ), 15, 60, needs_cuda=False),
        Stage("pytest-cuda", "pytest -m cuda (kernels, engine parity with HF, VRAM pulls)", (
            f"{q} -m pytest -m cuda -q -p no:cacheprovider -o addopts=-ra tests",
        ), 120, 200),
        Stage("kernels", "paged decode attention GB/s vs HBM copy GB/s, prefill TFLOP/s", (
            f"{gpu} kernels" + (" --quick" if quick else ""),
        ), 30, 90),
        # UCX_PROTO_INFO prints the protocol UCX picks per transfer (CUDA IPC expected).
        Stage("transfer", "kvxfer bench transfer --device cuda: 4k/32k tokens, P1->D1 and P2->D2 on one GPU", (
            *transfers,
            "grep -ihE 'cuda_ipc|cuda_copy|rc_mlx5|tcp|sysv|posix|cma|rndv|zcopy' \"$STAGE_LOG\" "
            "| grep -v '^{' | sort | uniq -c | sort -rn | head -20 || true",
        ), 90, 180, env=(("UCX_PROTO_INFO", "y"),)),
        Stage("parity", "bf16 greedy parity with HF bf16 (near-tie tolerance)", (
            f"{gpu} parity --preset tiny-qwen3",
            f"{gpu} parity --preset tiny-deepseek-mla",
        ), 45, 120),
        Stage("decode", "decode step time vs the memory-bandwidth floor, eager and CUDA graphs", (
            f"{gpu} decode" + (" --quick" if quick else ""),
        ), 90, 180),
        Stage("engine", "kvxfer bench engine, qwen3-0.6b shape, 256 prompts, 100-1024 in/out", (engine,), 150, 300),
        Stage("accuracy", "P/D accuracy test on one GPU (prefill, decode, reference sharing it)", (accuracy,), 90, 200),
    ]


def install_wheels(wheel_dir: Path, site: Path, log: Path) -> StageResult:
    """Install the carried wheels (no index, no dependency resolution) into `site`."""
    wheels = sorted(glob.glob(str(wheel_dir / "*.whl")))
    if not wheels:
        return StageResult("wheels", "carried wheels", "skipped", f"no wheels in {wheel_dir}")
    start = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--upgrade", "--target", str(site), *wheels]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    status = "passed" if proc.returncode == 0 else "failed"
    return StageResult("wheels", f"install {len(wheels)} carried wheels into {site}", status,
                       "" if status == "passed" else f"pip exited {proc.returncode}",
                       round(time.monotonic() - start, 1), str(log))


def run_stage(stage: Stage, log: Path, env: dict[str, str], timeout_s: float) -> StageResult:
    """Run the stage's commands in order, in one new process group each, within `timeout_s`."""
    result = StageResult(stage.name, stage.title, "passed", log=str(log))
    start = time.monotonic()
    env = env | dict(stage.env) | {"STAGE_LOG": str(log)}
    with open(log, "w") as f:
        for command in stage.commands:
            left = timeout_s - (time.monotonic() - start)
            f.write(f"$ {command}\n")
            f.flush()
            pending: list[int] = []
            with _signals_held(pending):
                proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=f,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                for signum in pending:  # its handler runs here, where the clean-up below sees it
                    signal.raise_signal(signum)
                rc = proc.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                result.status, result.reason = "timed out", f"stopped after {timeout_s:.0f}s: {command}"
                break
            except BaseException:  # the check itself is stopped: take the stage's processes along
                _stop_group(proc)
                raise
            if rc != 0:
                result.status, result.reason = "failed", f"exit {rc}: {command}"
                break
    result.seconds = round(time.monotonic() - start, 1)
    result.results = _json_lines(log)
    return result


@contextmanager
def _signals_held(pending: list[int]):
    """Hold SIGINT and SIGTERM (recorded in `pending`) while a stage's process starts. One that
    came while Popen ran, after the fork but before `proc` was known, unwound past the clean-up
    and left the stage's process group running (seen once on a busy host)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread gets signals in Python, and only it may set handlers
        return
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: not set from Python


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the command's process group (servers stop cleanly), SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while _group_alive(proc) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group_alive(proc):
            break
    proc.wait()


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader: a zombie would keep the group alive
    try:
        os.killpg(proc.pid, 0)
        return True
    except ProcessLookupError:
        return False


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _json_lines(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def cuda_available(py: str, env: dict[str, str]) -> tuple[bool, str]:
    code = "import torch; print(torch.cuda.is_available() and torch.cuda.get_device_name(0) or '')"
    try:
        proc = subprocess.run([py, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, ""
    name = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""
    return bool(name), name


def write_summary(out: Path, meta: dict, results: list[StageResult]) -> None:
    data = {**meta, "stages": [dataclasses.asdict(r) for r in results]}
    (out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# kvxfer gpu-check: {meta['device'] or 'no GPU'}", "",
             f"budget {meta['budget_s']:.0f} s, used {meta['elapsed_s']:.0f} s", "",
             "| stage | status | seconds | what |", "|---|---|---|---|"]
    for r in results:
        status = r.status + (f" ({r.reason})" if r.reason else "")
        lines.append(f"| {r.name} | {status} | {r.seconds:.0f} | {r.title} |")
    for r in results:
        if r.results:
            lines += ["", f"## {r.name}", ""] + [f"    {json.dumps(x)}" for x in r.results]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for summary.json, summary.md and logs/")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget, wheels included")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="carried wheels (see `make gpu-wheels`)")
    parser.add_argument("--site", default="/tmp/kvxfer-site", help="where the wheels are installed")
    parser.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small workloads: checks the orchestration")
    parser.add_argument("--dry-run", action="store_true", help="print the stages' commands and exit")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    all_stages = stages(sys.executable, args.quick)
    names = [s.name for s in all_stages]
    only = args.only.split(",") if args.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"--only: unknown stages {unknown}; known: {names}")
    if args.dry_run:
        for s in all_stages:
            if s.name in only:
                print(f"[{s.name}] ~{s.estimate_s:.0f}s (limit {s.limit_s:.0f}s){' cuda' if s.needs_cuda else ''}: "
                      f"{s.title}")
                for command in s.commands:
                    print(f"    {command}")
        return 0

    # SIGTERM (a time limit around the whole check) unwinds like Ctrl-C: the running stage's
    # process group is stopped and the summary written.
    signal.signal(signal.SIGTERM, _terminate)
    start = time.monotonic()
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    site = Path(args.site)
    results = [install_wheels(Path(args.wheels), site, out / "logs" / "00-wheels.log")]
    env = dict(os.environ)
    pythonpath = [str(site)] if results[0].status == "passed" else []
    env["PYTHONPATH"] = os.pathsep.join(pythonpath + [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    has_cuda, device = cuda_available(sys.executable, env)
    meta = {"device": device, "budget_s": args.budget_s, "elapsed_s": 0.0, "python": sys.executable}
    print(f"gpu-check: {device or 'no GPU'}; budget {args.budget_s:.0f}s; logs in {out / 'logs'}", flush=True)
    try:
        for index, stage in enumerate(all_stages, start=1):
            if stage.name not in only:
                continue
            left = args.budget_s - (time.monotonic() - start) - RESERVE_S
            if stage.needs_cuda and not has_cuda:
                result = StageResult(stage.name, stage.title, "skipped", "no GPU")
            elif left < stage.estimate_s:
                result = StageResult(stage.name, stage.title, "skipped",
                                     f"not enough time: {max(left, 0):.0f}s left, needs ~{stage.estimate_s:.0f}s")
            else:
                print(f"[{stage.name}] {stage.title} (limit {min(stage.limit_s, left):.0f}s)", flush=True)
                log = out / "logs" / f"{index:02d}-{stage.name}.log"
                try:
                    result = run_stage(stage, log, env, min(stage.limit_s, left))
                except (KeyboardInterrupt, SystemExit):
                    results.append(StageResult(stage.name, stage.title, "timed out", "the check was stopped",
                                               log=str(log), results=_json_lines(log)))
                    raise
            print(f"[{stage.name}] {result.status}{': ' + result.reason if result.reason else ''} "
                  f"({result.seconds:.0f}s)", flush=True)
            results.append(result)
            meta["elapsed_s"] = round(time.monotonic() - start, 1)
            write_summary(out, meta, results)  # after every stage: a cut-off run still leaves one
    finally:
        meta["elapsed_s"] = round(time.monotonic() - start, 1)
        write_summary(out, meta, results)
    print((out / "summary.md").read_text())
    return 1 if any(r.status in ("failed", "timed out") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
