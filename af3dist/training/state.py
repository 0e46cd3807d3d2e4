"""What a training checkpoint holds beyond DeepSpeed's own state, and the run's metrics log."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from af3dist import storage
from af3dist.storage import join, write_text

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
ADAPTER_DIR = "adapter"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def train_shard_name(rank: int) -> str:
    """The dataset that holds rank `rank`'s own read units: each rank reads a fixed part of the plan in plan
    order, so its stream is the same on every run and a resume can skip exactly what it trained on
    (a split stream hands blocks to whichever rank asks first)."""
    return f"train_rank{rank}"


@dataclass
class TrainerState:
    """Where training stands: optimizer step and the data position inside the current epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this worker's shard already consumed this epoch
    samples_seen: int = 0
    metrics: dict = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        (folder / TRAINER_STATE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> "TrainerState":
        return cls(**json.loads((folder / TRAINER_STATE).read_text()))


class MetricsLog:
    """metrics.jsonl (one JSON object per event, rewritten whole so a reader never sees half a line)
    plus TensorBoard scalars. After a resume, entries past the restored step are dropped."""

    def __init__(self, output_dir: str, resume_step: int = 0):
        self.path = join(output_dir, "metrics.jsonl")
        self.records: list[dict] = []
        if storage.exists(self.path):
            with storage.open_file(self.path, "r") as f:
                self.records = [r for r in map(json.loads, f.read().splitlines()) if r.get("step", 0) <= resume_step]
        self.writer = None
        if storage.is_remote(output_dir):
            log.warning("TensorBoard events are written for a local output_dir only; %s gets metrics.jsonl, "
                        "which holds the same scalars", output_dir)
        else:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir, "tensorboard")), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is optional
                self.writer = None

    def log(self, record: dict) -> None:
        self.records.append(record)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        write_text(self.path, text)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class SampleLog:
    """sample_ids/rank<R>.jsonl: the example ids each optimizer step of this rank trained on, one line per
    step (`train.log_sample_ids`), to audit what a run saw, e.g. that a resumed run saw exactly what an
    uninterrupted one does. After a resume, lines past the restored step are dropped; a line cut short by
    a kill is ignored. Local output dirs only."""

    def __init__(self, output_dir: str, rank: int, resume_step: int = 0):
        self.path = Path(output_dir, "sample_ids", f"rank{rank}.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in self.read(self.path) if line["step"] <= resume_step]
        write_text(str(self.path), "".join(json.dumps(line) + "\n" for line in kept))
        self.file = self.path.open("a")

    @staticmethod
    def read(path: Path) -> list[dict]:
        lines = []
        if path.is_file():
            for text in path.read_text().splitlines():
                try:
                    lines.append(json.loads(text))
                except json.JSONDecodeError:
                    continue
        return lines

    def write(self, step: int, ids: list[str]) -> None:
        self.file.write(json.dumps({"step": step, "ids": ids}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

