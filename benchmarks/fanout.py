"""Fan-out of the embed step: the same parts encoded by 1 vs 2 gpu-pool workers (one CPU each).

A private SeaweedFS and a Prefect server (on PostgreSQL when 127.0.0.1:5432 answers, in a scratch database dropped
at the end; else SQLite), the ``embed-shard/gpu`` deployment, and K process workers (``--limit 1``, each pinned
to one CPU with ``taskset``, ``ADAPTFLOW_ENCODE_WORKERS=1``: one thread each). The rows are planned into 2 parts
(``orchestration.shard_rows`` = rows / 2) and ``tasks.fanout.run_parts`` submits both and waits: with 1 worker
the parts run one after the other, with 2 at once. Each K starts from a cold cache (its own bucket). The ratio
is wall(1 worker) / wall(2 workers) of that wait; the per-part split (flow run start → encode task → end) says
what limits it.

    python -m benchmarks.fanout                      # 20k tweets, MiniLM cut to 1 layer
    python -m benchmarks.fanout --rows 200000 --layers 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import REPO, TWEETS, RT_CSV, build_probe_encoder, loadavg, log, machine_info


def _texts(rows: int) -> "list[str]":
    """``rows`` distinct texts: the tweets (or the bundled reviews), pairs of them past their count."""
    import pandas as pd

    source = pd.read_parquet(TWEETS) if TWEETS.is_file() else pd.read_csv(RT_CSV)
    texts = list(dict.fromkeys(source["text"].astype(str).str.strip()))
    out, n, k = list(texts[:rows]), len(texts), 1
    while len(out) < rows:  # pair i with i + k: distinct for distinct (i, k)
        out += [f"{texts[i]} {texts[(i + k) % n]}" for i in range(min(n, rows - len(out)))]
        k += 1
    return out


_MATMUL = ("import time, torch; torch.set_num_threads(1); a = torch.randn(512, 512); n = 0; t = time.perf_counter()\n"
           "while time.perf_counter() - t < {s}:\n    a @ a; n += 1\nprint(n / (time.perf_counter() - t))")


def parallel_ceiling(seconds: float = 8) -> dict:
    """What a second single-threaded process adds on this machine now: 512² fp32 matmuls/s of one process pinned
    to CPU 0, then of two at once pinned to CPUs 0 and 1 (the same pinning as the workers). On a shared machine the
    other tenants' load decides it; the fan-out cannot beat it."""
    def start(cpu: int) -> subprocess.Popen:
        pin = ["taskset", "-c", str(cpu)] if shutil.which("taskset") else []
        return subprocess.Popen([*pin, sys.executable, "-c", _MATMUL.format(s=seconds)], stdout=subprocess.PIPE,
                                text=True)

    alone = float(start(0).communicate()[0])
    pair = [start(0), start(1)]
    together = sum(float(p.communicate()[0]) for p in pair)
    return {"one_process": round(alone, 1), "two_processes": round(together, 1),
            "ceiling": round(together / alone, 2)}


def _postgres() -> str | None:
    try:
        import psycopg2

        psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3).close()
        return "postgresql://postgres@127.0.0.1:5432"
    except Exception:  # noqa: BLE001
        return None


def run(rows: int = 20_000, layers: int = 1, work: Path | None = None) -> dict:
    import pandas as pd
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from adaptflow import stack
    from adaptflow.config import RunConfig
    from adaptflow.sharding import plan_stage
    from adaptflow.stages import StageContext, ingest_stage, resolve_encoder_stage, tokenize_stage, validate_stage

    own_work = work is None
    work = Path(work or tempfile.mkdtemp(prefix="adaptflow-fanout-"))
    encoder_path = build_probe_encoder(work / f"minilm-{layers}l", layers=layers)
    data = work / "rows.parquet"
    texts = _texts(rows)
    pd.DataFrame({"text": texts, "label": [("a", "b")[i % 2] for i in range(len(texts))]}).to_parquet(data)
    postgres = _postgres()
    database = f"bench_{uuid.uuid4().hex[:10]}_prefect"
    taken: set[int] = set()
    ports = {"s3": stack.free_port(taken, twin=True), "prefect": stack.free_port(taken)}
    state = work / "stack"
    result: dict = {"rows": len(texts), "data": str(TWEETS if TWEETS.is_file() else RT_CSV), "encoder": f"all-MiniLM-L6-v2 cut to {layers} layer(s)", "parts": 2,
                    "prefect_backend": "postgresql" if postgres else "sqlite", "machine": machine_info()}
    workers: list[subprocess.Popen] = []
    try:
        stack.up(state, services=("s3", "prefect"), ports=ports, timeout=180, log=lambda m: log(f"stack: {m}"),
                 postgres=postgres, databases={"prefect": database})
        api = stack.status(state)["prefect"]["api_url"]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "MLFLOW_"))},
               "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1", "HF_HUB_OFFLINE": "1",
               "ADAPTFLOW_STATE_DIR": str(state), "ADAPTFLOW_ENCODE_WORKERS": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO)}
        os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "ADAPTFLOW_STATE_DIR")})
        for k in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_"))]:
            del os.environ[k]
        with temporary_settings(updates={PREFECT_API_URL: api}):
            from deployments.deploy import SHARD_DEPLOYMENT, deploy_shard, ensure_pools
            from tasks.fanout import run_parts

            ensure_pools()
            deploy_shard(REPO)
            with get_client(sync_client=True) as client:
                client.update_global_concurrency_limit("gpu", GlobalConcurrencyLimitUpdate(limit=2))
            for count in (1, 2):
                bucket = f"fanout-{count}w-{uuid.uuid4().hex[:8]}"
                os.environ["ADAPTFLOW_BUCKET"] = bucket
                ctx = StageContext.from_env(stack.stack_settings(state, bucket=bucket, cache_dir=work / "cache"))
                config = RunConfig.model_validate({
                    "name": "fanout-bench", "data": {"train": str(data), "test_size": 0.01},
                    "encoder": {"ref": str(encoder_path), "max_length": 128, "dtype": "fp32"},
                    "orchestration": {"shard_rows": (rows + 1) // 2, "gpu_timeout_s": 3600}})
                validated = validate_stage(ctx, config, ingest_stage(ctx, config))
                encoder = resolve_encoder_stage(ctx, config)
                tokens = tokenize_stage(ctx, config, validated, encoder)
                plan = plan_stage(ctx, config, tokens, encoder)
                assert len(plan["parts"]) == 2, plan
                result["rows_encoded"] = plan["todo"]  # distinct texts after validation
                workers = []
                for i in range(count):
                    args = ["taskset", "-c", str(i)] if shutil.which("taskset") else []
                    log_file = (work / f"worker-{count}-{i}.log").open("w")
                    workers.append(subprocess.Popen(
                        [*args, sys.executable, "-m", "adaptflow", "worker", "--pool", "gpu", "--limit", "1"],
                        env={**env, "ADAPTFLOW_BUCKET": bucket}, cwd=REPO, stdout=log_file,
                        stderr=subprocess.STDOUT, start_new_session=True))
                with get_client(sync_client=True) as client:
                    deadline = time.monotonic() + 180
                    while sum(w.status.value == "ONLINE" for w in client.read_workers_for_work_pool("gpu")) < count:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{count} gpu workers not online")
                        time.sleep(0.5)
                    before = {r.id for r in client.read_flow_runs()}
                    load = loadavg()
                    started = time.perf_counter()
                    run_parts.fn(SHARD_DEPLOYMENT, config, plan, encoder)
                    wall = time.perf_counter() - started
                    runs = [r for r in client.read_flow_runs() if r.id not in before]
                    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=[r.id for r in runs])))
                    encode = {t.flow_run_id: t for t in task_runs if t.name.startswith("embed_part")}
                    parts = [{"flow_run_s": round((r.end_time - r.start_time).total_seconds(), 1),
                              "before_encode_s": round((encode[r.id].start_time - r.start_time).total_seconds(), 1),
                              "encode_task_s": round((encode[r.id].end_time - encode[r.id].start_time)
                                                     .total_seconds(), 1)} for r in runs]
                for worker in workers:
                    _stop(worker)
                workers = []
                result[f"{count}_workers"] = {"wall_s": round(wall, 1), "rows_per_s": round(plan["todo"] / wall, 1),
                                              "load_before": load, "parts": parts}
                log(f"fan-out {count} worker(s): {wall:.1f} s for {plan['todo']} rows; {parts}")
        result["ratio"] = round(result["1_workers"]["wall_s"] / result["2_workers"]["wall_s"], 2)
        result["machine_parallelism"] = parallel_ceiling()
        log(f"fan-out: 2 workers vs 1 = {result['ratio']}x (goal >= 1.7x); this machine now gives a second "
            f"single-threaded process {result['machine_parallelism']['ceiling']}x (matmul, same pinning)")
    finally:
        for worker in workers:
            _stop(worker)
        stack.down(state)
        if postgres:
            import psycopg2

            connection = psycopg2.connect(f"{postgres}/postgres")
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            connection.close()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _stop(process: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--layers", type=int, default=1, help="MiniLM layers kept (1: the memory row's cut)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    result = run(args.rows, args.layers)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
