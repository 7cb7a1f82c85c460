"""The daemon reads `daemon.eval_file` with its own store settings (io.reasoning,
loss.cross_tokenizer), as its training reads a batch: `cross_tokenizer: off` with a held-out file
of another tokenizer's rows stops the start (exit 2, naming the file), where the held-out eval had
carried them with the defaults while training refused such a batch."""

from __future__ import annotations

import pytest
from daemon_helpers import daemon_config, one_thread  # noqa: F401 - autouse fixture: one torch thread
from test_align import toks  # noqa: F401  (the two tokenizers, a fixture)
from test_cross_tokenizer import tok_dirs  # noqa: F401
from test_leftovers_heldout import files, fine_student_dir  # noqa: F401

from kdforge.errors import DataError


def test_cross_tokenizer_off_refuses_a_held_out_file_of_another_tokenizer_at_start(
        tmp_path, fine_student_dir, files):  # noqa: F811
    from datetime import datetime

    from kdforge.config import load_config
    from kdforge.daemon.service import Daemon

    cfg = daemon_config(tmp_path / "d.yaml", fine_student_dir, loss={"kind": "fkl", "kd_weight": 0.5,
                                                                     "cross_tokenizer": "off"},
                        settle_seconds=0, eval_file=str(files["rows"]))
    base = tmp_path / "training"
    d = Daemon(base, load_config([cfg]), now=datetime.now, handle_signals=False)
    with pytest.raises(DataError, match="logit KD needs the teacher's tokenizer") as e:  # the CLI: exit 2
        d.run(once=True)
    assert str(e.value).startswith(f"daemon.eval_file: {files['rows']}:1: "), str(e.value)
