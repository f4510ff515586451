"""The console bar: its ETA counts training steps only, and it draws nothing when disabled."""

import io
import time

from finetune.train.logs import paused, progress_bar


def test_time_spent_rendering_samples_is_left_out_of_the_bar_rate_and_eta():
    out = io.StringIO()
    bar = progress_bar(10, 0, True, file=out, mininterval=0)
    bar.update(1)
    with paused(bar):
        time.sleep(0.5)  # a sample grid rendering
    bar.update(1)
    assert bar.format_dict["elapsed"] < 0.3  # without the pause: >= 0.5 s, and the ETA would count it
    bar.close()


def test_a_disabled_bar_takes_every_call_and_draws_nothing(capsys):
    bar = progress_bar(10, 3, False)
    bar.update(1)
    bar.set_postfix(loss="0.1")
    with paused(bar):
        pass
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""
