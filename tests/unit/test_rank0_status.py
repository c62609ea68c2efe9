"""The rank prefix of every log line and each rank's log file name (slim.ranks)."""

import logging
from pathlib import Path

from slim.ranks import RankFormatter, rank_log_file


def test_every_line_of_a_record_names_the_rank():
    fmt = RankFormatter(logging.Formatter("[%(levelname)s] - %(message)s"), 1, 2)
    record = logging.LogRecord("slim", logging.ERROR, __file__, 1, "first\nsecond", None, None)
    assert fmt.format(record).split("\n") == ["[rank 1/2] [ERROR] - first", "[rank 1/2] second"]


def test_rank_0_keeps_hydras_file_the_others_get_their_own():
    assert rank_log_file(Path("/run/main.log"), 0) == Path("/run/main.log")
    assert rank_log_file(Path("/run/main.log"), 3) == Path("/run/main.rank3.log")
