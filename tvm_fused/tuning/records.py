"""Tuning records in the repository: compaction, the choice of a config, staleness.

``tuning_logs/<gpu>/<op key>/`` holds, per tuned op configuration:

- ``database_tuning_record.json.xz``: MetaSchedule's record table, the best few per workload
  of the op's buckets, xz-compressed (each trace is kilobytes of JSON);
- ``database_workload.json.xz``: its workload table, each line ``[structural hash, the
  module's JSON]`` (MetaSchedule frames that JSON in base64; plain, the compressor shares
  the buckets' near-identical modules: a third of the size), xz-compressed;
- ``metadata.json``: GPU, versions, date, trials, and per bucket the workload's structural
  hash, the best and the default time;
- ``decisions.json`` (``decisions.py``): the config chosen per bucket, which is all the
  runtime reads.
"""

from __future__ import annotations

import base64
import json
import lzma
import struct
import warnings
from pathlib import Path

from ..schedules.space import config_from_trace

RECORDS = "database_tuning_record.json"  # MetaSchedule's tables in a work directory
WORKLOADS = "database_workload.json"
FOLDER_RECORDS, FOLDER_WORKLOADS = RECORDS + ".xz", WORKLOADS + ".xz"  # in a records folder
METADATA = "metadata.json"
KEEP_PER_WORKLOAD = 3
# A tuned config replaces the default only if this much faster. On the H100 the same kernel
# measured up to 6% apart between runs at ~6 us (launch-bound decode), so less is noise.
MIN_SPEEDUP = 1.10


def mean_seconds(run_secs) -> float:
    secs = [float(s) for s in run_secs]
    return sum(secs) / len(secs) if secs else float("inf")


def _parse(line: str):
    """``(workload index, trace json, run seconds)`` of a record line (ValueError if
    malformed)."""
    try:
        index, (trace, run_secs, *_) = json.loads(line)
        return int(index), trace, [float(s) for s in run_secs]
    except (TypeError, ValueError) as err:
        raise ValueError(str(err)) from err


def read_records(path: Path) -> list[tuple[int, list, list[float], str]]:
    """``(workload index, trace json, run seconds, line)`` of each measured record; malformed
    lines are skipped with a warning, failed runs silently."""
    records = []
    with _open_text(path) as table:
        lines = table.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            index, trace, run_secs = _parse(line)
        except ValueError as err:
            warnings.warn(f"tvm_fused: skipping malformed tuning record {path}:{number}: {err}",
                          stacklevel=2)
            continue
        if run_secs and max(run_secs) < 1e9:  # MetaSchedule marks failed runs with 1e10
            records.append((index, trace, run_secs, line))
    return records


def drop_malformed_lines(path: Path) -> int:
    """Rewrite a JSON-lines table without its lines that do not parse (a run killed while
    writing leaves a truncated last line, on which MetaSchedule's reader would stop); return
    how many went, each with a warning."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            json.loads(line)
            kept.append(line)
        except ValueError:
            if line.strip():
                dropped += 1
                warnings.warn(f"tvm_fused: dropping malformed line {path}:{number}",
                              stacklevel=2)
    if dropped:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def _open_text(path: Path):
    """A table (plain or ``.xz``) opened for reading text."""
    return (lzma.open if str(path).endswith(".xz") else open)(path, "rt")


def workload_hashes(path: Path) -> list[str]:
    """Structural hashes of a workload table (plain or ``.xz``), in line order."""
    with _open_text(path) as lines:
        return [json.loads(line)[0] for line in lines if line.strip()]


def workload_line(digest: str, module: dict) -> str:
    """A records folder's workload line: ``[hash, the module's JSON]``."""
    return json.dumps([digest, module], separators=(",", ":"))


def _plain_workload(line: str) -> str:
    """A work directory's workload line ``[hash, frame]`` (the module's JSON after its
    length, a little-endian uint64, base64-encoded) as a folder's ``workload_line``."""
    digest, frame = json.loads(line)
    raw = base64.b64decode(frame)
    (length,) = struct.unpack_from("<Q", raw)
    return workload_line(digest, json.loads(raw[8:8 + length]))


def best_records(path: Path, workloads: Path) -> dict[str, list]:
    """Workload hash -> its records ``(mean seconds, trace, line)``, fastest first (tables
    plain or ``.xz``)."""
    hashes = workload_hashes(workloads)
    by_hash: dict[str, list] = {}
    for index, trace, run_secs, line in read_records(path):
        by_hash.setdefault(hashes[index], []).append((mean_seconds(run_secs), trace, line))
    return {h: sorted(rs, key=lambda r: r[0]) for h, rs in by_hash.items()}


def folder_best_records(path: Path) -> dict[str, list]:
    """``best_records`` of the records folder ``path``."""
    return best_records(Path(path) / FOLDER_RECORDS, Path(path) / FOLDER_WORKLOADS)


def compact(work_dir: Path, dest: Path, space, defaults: dict,
            keep: int = KEEP_PER_WORKLOAD) -> None:
    """Write ``dest``: for each workload of ``defaults`` (workload hash -> the hand-written
    default of its bucket: the op's buckets, whatever else the database in ``work_dir``
    holds) its ``keep`` best records and the best record of its default config, and those
    workloads, renumbered; both tables xz-compressed."""
    dest.mkdir(parents=True, exist_ok=True)
    workloads = Path(work_dir) / WORKLOADS
    best = best_records(Path(work_dir) / RECORDS, workloads)
    kept = sorted(h for h in best if h in defaults)
    lines = {json.loads(line)[0]: line for line in workloads.read_text().splitlines()
             if line.strip()}
    with lzma.open(dest / FOLDER_WORKLOADS, "wt", preset=9) as out:
        out.writelines(_plain_workload(lines[h]) + "\n" for h in kept)
    with lzma.open(dest / FOLDER_RECORDS, "wt", preset=9) as out:
        for new_index, h in enumerate(kept):
            default = default_records(best[h], space, defaults[h])
            chosen = best[h][:keep] + [r for r in default[:1] if r not in best[h][:keep]]
            for _, _, line in chosen:
                record = json.loads(line)
                record[0] = new_index
                out.write(json.dumps(record, separators=(",", ":")) + "\n")


def load_metadata(path: Path) -> dict:
    return json.loads((Path(path) / METADATA).read_text())


def _config(trace, space):
    """The schedule config a record's trace chose, or None (with a warning) if ScheduleConfig
    rejects it (records may hold combinations now refused)."""
    try:
        return config_from_trace(trace, space)
    except (ValueError, IndexError, KeyError) as error:
        warnings.warn(f"tvm_fused: skipping a tuning record: {error!r}", stacklevel=3)
        return None


def default_records(ranked: list, space, default) -> list:
    """The records among ``ranked`` (``(secs, trace, line)``, fastest first) of the config
    ``default``."""
    return [record for record in ranked if _config(record[1], space) == default]


def choose(ranked: list, space, default):
    """The config to build from a workload's records, fastest first: ``default`` (the
    bucket's hand-written one) unless a record is ``MIN_SPEEDUP`` times faster than the
    default's own record (the margin is the run-to-run spread of microsecond kernels, and
    the default is the better-tested one). Without a record of the default (tuning always
    measures it first: such records were taken against another default) nothing was shown
    to beat it, so the default."""
    usable = [(secs, config) for secs, trace, _ in ranked
              if (config := _config(trace, space)) is not None]
    default_secs = [secs for secs, config in usable if config == default]
    if not default_secs or usable[0][0] * MIN_SPEEDUP > default_secs[0]:
        return default
    return usable[0][1]
