"""The console bar: its ETA counts training steps only, and it draws nothing when disabled."""

import io

from finetune.train.logs import paused, progress_bar


def test_time_spent_rendering_samples_is_left_out_of_the_bar_rate_and_eta():
    now = [1000.0]
    bar = progress_bar(10, 0, True, clock=lambda: now[0], file=io.StringIO(), mininterval=0)
    now[0] += 2.0
    bar.update(1)
    with paused(bar):
        now[0] += 30.0  # a sample grid rendering
    now[0] += 2.0
    bar.update(1)
    assert bar.format_dict["elapsed"] == 4.0  # without the pause: 34 s, and the ETA would count it
    assert bar.format_dict["rate"] == 0.5  # steps per second of training alone
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
