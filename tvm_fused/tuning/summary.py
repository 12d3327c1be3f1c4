"""What tuning found, per GPU, op and bucket: the best record against the hand-written
default's own and what the decisions keep (``python -m tvm_fused records``), read from each
records folder's ``metadata.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..form import Form
from ..schedules.config import default_for_tokens
from .records import METADATA


@dataclasses.dataclass(frozen=True)
class BucketResult:
    """One bucket of one records folder: times in µs (None: not measured), and the knobs
    the decided config changes from the default (empty: the default is kept)."""

    gpu: str
    op: str  # the records folder's name (``layout.op_key``)
    tokens: int
    best_us: float | None
    default_us: float | None
    changed: dict

    @property
    def gain(self) -> float | None:
        """The default's time over the best record's (above 1: a record was faster)."""
        if self.best_us is None or self.default_us is None:
            return None
        return self.default_us / self.best_us


def bucket_results(logs_dir: Path) -> list[BucketResult]:
    """Every bucket of every records folder under ``logs_dir`` (``<gpu>/<op>/``)."""
    results = []
    for path in sorted(Path(logs_dir).glob(f"*/*/{METADATA}")):
        metadata = json.loads(path.read_text())
        op = Form(**metadata["op"])
        for tokens, bucket in sorted(metadata["buckets"].items(), key=lambda b: int(b[0])):
            chosen = bucket["chosen"]
            default = dataclasses.asdict(default_for_tokens(int(tokens), op))
            changed = {} if chosen == "default" else {
                name: value for name, value in chosen.items() if default[name] != value}
            results.append(BucketResult(metadata["gpu"], path.parent.name, int(tokens),
                                        bucket["best_us"], bucket["default_us"], changed))
    return results


def _us(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(results: list[BucketResult]) -> str:
    """One table per GPU: op, bucket, best and default µs, the gain, the decision."""
    tables = []
    for gpu in dict.fromkeys(r.gpu for r in results):
        lines = [f"{gpu}\n", "| op | tokens | best µs | default µs | default / best | decided |",
                 "| --- | ---: | ---: | ---: | ---: | --- |"]
        for r in (r for r in results if r.gpu == gpu):
            gain = "" if r.gain is None else f"{r.gain:.2f}x"
            decided = ", ".join(f"{k}={v}" for k, v in r.changed.items()) or "default"
            lines.append(f"| {r.op} | {r.tokens} | {_us(r.best_us)} | {_us(r.default_us)} | "
                         f"{gain} | {decided} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"
