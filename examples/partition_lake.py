"""Split examples/data/rotten_tomatoes.csv into a small Hive-partitioned lake, one ``dt=`` folder a day.

    python examples/partition_lake.py [--days 4] [--out examples/data/rotten_tomatoes_lake]

writes ``<out>/dt=2026-11-27/part-0.parquet`` … (rows in file order, split into ``--days`` nearly equal runs),
what ``examples/rotten_tomatoes_partitioned.yaml`` trains on. A new day is one more folder:
``<out>/dt=2026-12-01/part-0.parquet`` (Parquet, CSV or JSONL with the same columns).
"""

from __future__ import annotations

import argparse
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=HERE / "data" / "rotten_tomatoes.csv")
    parser.add_argument("--out", type=Path, default=HERE / "data" / "rotten_tomatoes_lake")
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--first-day", type=date.fromisoformat, default=date(2026, 11, 27))
    args = parser.parse_args()
    frame = pd.read_csv(args.csv, dtype=str, keep_default_na=False)
    for i, chunk in enumerate(np.array_split(np.arange(len(frame)), args.days)):
        folder = args.out / f"dt={args.first_day + timedelta(days=i)}"
        folder.mkdir(parents=True, exist_ok=True)
        frame.iloc[chunk].to_parquet(folder / "part-0.parquet", index=False, compression="zstd")
        print(f"{folder / 'part-0.parquet'}: {len(chunk)} rows")


if __name__ == "__main__":
    main()
