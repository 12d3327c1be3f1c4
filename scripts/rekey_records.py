"""Re-key committed tuning records to the current TensorIR definition.

MetaSchedule files a record under its workload's structural hash, so any change to the
definition orphans every committed folder (``test_committed_records_match_the_current_
definition`` fails). Where the change leaves the schedule space and its knobs as they were
(the records' traces still name the same configs), the folders can follow it: each bucket's
workload is rebuilt from the folder's form, its hash and module replace the old ones, the
records and decisions stay, and ``metadata.json`` gains a line under ``rekeyed`` saying what
changed, so that a reader knows the times were measured on the earlier kernels. A change
that alters the kernels' speed calls for a re-tune on the GPU instead (``tvm-fused tune``).

usage: python scripts/rekey_records.py "NOTE" [FOLDER ...]   (default: every folder under
tuning_logs/)
"""

from __future__ import annotations

import datetime
import json
import lzma
import sys
from pathlib import Path

import tvm

from tvm_fused.form import Form
from tvm_fused.tuning import records
from tvm_fused.tuning.layout import default_logs_dir
from tvm_fused.tuning.workload import bucket_workload, workload_hash


def rekey(folder: Path, note: str) -> int:
    """Re-key ``folder`` to the current definition; returns how many buckets changed."""
    metadata = records.load_metadata(folder)
    form = Form(**metadata["op"])
    table = folder / records.FOLDER_WORKLOADS
    with lzma.open(table, "rt") as lines:
        stored = [json.loads(line)[0] for line in lines if line.strip()]
    new_hash, module = {}, {}
    for tokens, entry in metadata["buckets"].items():
        workload = bucket_workload(form, int(tokens))
        new_hash[entry["workload"]] = workload_hash(workload)
        module[entry["workload"]] = json.loads(tvm.ir.save_json(workload))
        entry["workload"] = new_hash[entry["workload"]]
    changed = sum(old != new for old, new in new_hash.items())
    if not changed:
        return 0
    with lzma.open(table, "wt", preset=9) as out:  # same order: records index the lines
        out.writelines(records.workload_line(new_hash[h], module[h]) + "\n" for h in stored)
    metadata.setdefault("rekeyed", []).append(f"{datetime.date.today()}: {note}")
    (folder / records.METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    return changed


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    note, folders = argv[0], [Path(a) for a in argv[1:]]
    folders = folders or sorted(p.parent for p in default_logs_dir().glob(
        f"*/*/{records.METADATA}"))
    for folder in folders:
        print(f"{folder}: {rekey(folder, note)} buckets re-keyed")


if __name__ == "__main__":
    main(sys.argv[1:])
