"""scripts/rekey_records.py: a folder whose workloads no longer match the definition is
re-keyed to it (hashes and modules), its records and decisions kept, and says so."""

import json
import lzma
import shutil
import sys
from pathlib import Path

from tvm_fused.form import Form
from tvm_fused.tuning import decisions, records
from tvm_fused.tuning.layout import default_logs_dir
from tvm_fused.tuning.workload import bucket_workload, workload_hash

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import rekey_records

FOLDER = default_logs_dir() / "nvidia-h200" / "bfloat16-h16-r64-d512-p128-gptj"


def _stale_copy(tmp_path: Path) -> Path:
    """A copy of a committed folder whose workload hashes are those of another definition."""
    folder = tmp_path / FOLDER.name
    shutil.copytree(FOLDER, folder)
    metadata = records.load_metadata(folder)
    stale = {entry["workload"]: str(int(entry["workload"]) ^ 1)
             for entry in metadata["buckets"].values()}
    for entry in metadata["buckets"].values():
        entry["workload"] = stale[entry["workload"]]
    (folder / records.METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    table = folder / records.FOLDER_WORKLOADS
    with lzma.open(table, "rt") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    with lzma.open(table, "wt") as out:
        out.writelines(json.dumps([stale[h], module]) + "\n" for h, module in rows)
    return folder


def test_a_stale_folder_is_rekeyed_and_says_so(tmp_path):
    folder = _stale_copy(tmp_path)
    before = (folder / records.FOLDER_RECORDS).read_bytes(), decisions.read(folder)
    assert rekey_records.rekey(folder, "a test's change") == 4
    metadata = records.load_metadata(folder)
    op = Form(**metadata["op"])
    for tokens, entry in metadata["buckets"].items():
        assert entry["workload"] == workload_hash(bucket_workload(op, int(tokens)))
    assert sorted(records.workload_hashes(folder / records.FOLDER_WORKLOADS)) == sorted(
        entry["workload"] for entry in metadata["buckets"].values())
    assert metadata["rekeyed"][-1].endswith(": a test's change")
    assert ((folder / records.FOLDER_RECORDS).read_bytes(), decisions.read(folder)) == before
    assert rekey_records.rekey(folder, "again") == 0  # current already: left alone
    assert records.load_metadata(folder)["rekeyed"][-1].endswith(": a test's change")
