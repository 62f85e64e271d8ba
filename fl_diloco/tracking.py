"""Optional experiment tracking: a run's per-round metrics as TensorBoard scalars.

Nothing here is needed to train: metrics.jsonl and summary.json are always written. With
`tensorboard=true` the same records also go to `<out_dir>/tensorboard/` as event files, which
`tensorboard --logdir runs/` shows offline (`pip install -e ".[tensorboard]"`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Writes the numeric fields of each round's record as scalars, at step = its round;
    the per-client entries under "clients" go to `client<partition_id>/<field>`."""

    def __init__(self, out_dir: Path | str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's writer needs the tensorboard package
            raise ImportError("tensorboard=true needs the tensorboard package: "
                              "pip install -e \".[tensorboard]\" (or set tensorboard=false)") from err
        self.log_dir = Path(out_dir) / TENSORBOARD_DIR
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        self._scalars("", record, step, skip=("round",))
        for client in record.get("clients") or []:
            if "partition_id" in client:  # node ids change between runs, partitions do not
                self._scalars(f"client{client['partition_id']}/", client, step,
                              skip=("partition_id", "node_id"))
        self._writer.flush()

    def _scalars(self, prefix: str, fields: dict[str, Any], step: int, skip: tuple[str, ...]) -> None:
        for key, value in fields.items():
            # bool is an int to Python, but a flag is not a curve; None and NaN are "not measured".
            if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(prefix + key, value, global_step=step)

    def close(self) -> None:
        self._writer.close()
