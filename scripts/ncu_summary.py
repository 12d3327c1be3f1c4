"""One row per kernel launch from scripts/ncu_kernels.sh's raw output.

Usage: python scripts/ncu_summary.py NCU_CSV [OUT_CSV]
Prints a markdown table (launch, grid, block, µs, DRAM MB read/written, DRAM throughput %,
achieved occupancy %) and writes it as CSV to OUT_CSV if given.
"""

import csv
import sys

METRICS = {"gpu__time_duration.sum": "us", "dram__bytes_read.sum": "dram_read_mb",
           "dram__bytes_write.sum": "dram_write_mb",
           "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct_of_peak",
           "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct"}
SCALE = {"us": 1e-3, "dram_read_mb": 1e-6, "dram_write_mb": 1e-6}  # from ns and bytes


def summarize(lines: list[str]) -> list[dict]:
    order = next(line for line in lines if line.startswith("launch order:"))
    labels = order.removeprefix("launch order:").strip().split(", ")
    launches: dict[str, dict] = {}
    for row in csv.DictReader(line for line in lines if line.startswith('"')):
        launch = launches.setdefault(row["ID"], {
            "launch": labels[int(row["ID"])], "kernel": row["Kernel Name"],
            "grid": row["Grid Size"], "block": row["Block Size"]})
        if row["Metric Name"] in METRICS:
            name = METRICS[row["Metric Name"]]
            value = float(row["Metric Value"].replace(",", "")) * SCALE.get(name, 1)
            launch[name] = round(value, 3)
    return list(launches.values())


def main(path: str, out_csv: str | None = None) -> None:
    with open(path) as f:
        rows = summarize(f.read().splitlines())
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    if out_csv:
        with open(out_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main(*sys.argv[1:])
