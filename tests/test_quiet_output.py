"""What a default run prints when its output goes to a file: the run's own lines and nothing
else (no library warnings, banners, progress bars of other tools or colour codes), with an
ETA on each round's line. One real simulation, on a local text file (the data source that
makes `datasets` draw its download bars)."""

import os
import random
import re
import subprocess
import sys

from fl_diloco.reporting import SUMMARY_NAME
from tests.conftest import small_config


def test_a_short_run_redirected_to_a_file_prints_only_its_own_lines(tmp_path):
    rng = random.Random(0)
    words = "the of and to a in that is was he for it with as his on be at by had".split()
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60))
                                                     for _ in range(300)))
    cfg = small_config(tmp_path, rounds=2, vocab_size=300, max_documents=0, document_unit="paragraph",
                       data_source=str(tmp_path / "corpus.txt"))
    overrides = [f"{key}={value}" for key, value in cfg.to_dict().items() if value != ""]
    log = tmp_path / "out.log"
    with log.open("w") as out:  # a file, as `fl-diloco train ... > out.log 2>&1` would give it
        code = subprocess.run([sys.executable, "-m", "fl_diloco.main", "train", *overrides], stdout=out,
                              stderr=subprocess.STDOUT, env=os.environ, timeout=600).returncode
    text = log.read_text()
    assert code == 0, text
    assert (tmp_path / "run" / SUMMARY_NAME).exists()
    assert "\x1b[" not in text, "colour codes in redirected output"
    for noise in ("Warning", "WARNING", "DEPRECATED", "Manually terminating", "Downloading", "Generating",
                  "Traceback", "it/s]"):
        assert noise not in text, f"{noise!r} in the output:\n{text}"
    rounds = [line for line in text.splitlines() if re.match(r"\[round +[12]/2\]", line)]
    assert len(rounds) == 2 and all(re.search(r"  eta \d+s$", line) for line in rounds), text
