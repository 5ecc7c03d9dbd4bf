"""The progress lines a person reads while training and scoring run."""

from __future__ import annotations

import time

from anogan_ray.pipelines.progress import ProgressCounter, epoch_line, format_duration, rate_line


def test_durations_read_as_a_person_says_them():
    assert format_duration(0.4) == "0 s"
    assert format_duration(12.3) == "12 s"
    assert format_duration(407) == "6 min 47 s"
    assert format_duration(2 * 3600 + 5 * 60 + 59) == "2 h 5 min"


def test_the_epoch_line_shows_losses_quality_and_time_left():
    line = epoch_line(
        "anogan",
        epoch=3,
        epochs=25,
        step=24,
        total_steps=200,
        means={"d_loss": 1.2149, "g_loss": 0.87352, "d_real": 0.6123, "d_fake": 0.38751},
        epoch_seconds=12.43,
        seconds_left=250.2,
        quality=0.021349,
    )
    assert line == (
        "anogan epoch 3/25, step 24/200: d_loss 1.215, g_loss 0.8735, d_real 0.6123, "
        "d_fake 0.3875; sliced W1 0.02135; 12.4 s, about 4 min 10 s left"
    )
    # an epoch without a quality figure (the encoder, the aCAE), and the last epoch
    last = epoch_line("anogan-acae", 5, 5, 40, 40, {"reconstruction_l1": 0.25}, 3.0, 0.0)
    assert last == "anogan-acae epoch 5/5, step 40/40: reconstruction_l1 0.25; 3.0 s, done"


def test_the_rate_line_shows_share_rate_and_time_left():
    assert rate_line(1234, 20_000, 41.3, "scored", "patches") == (
        "scored 1,234 / 20,000 patches (6.2 %), 41.3 patches/s, about 7 min 34 s left"
    )
    assert rate_line(3, 100, 0.3, "scored", "patches") == (
        "scored 3 / 100 patches (3.0 %), 0.3 patches/s, about 5 min 23 s left"
    )
    assert rate_line(0, 100, 0.0, "scored", "patches") == (
        "scored 0 / 100 patches (0.0 %), waiting for the first results"
    )
    assert rate_line(100, 100, 2.0, "scored", "patches") == (
        "scored 100 / 100 patches (100.0 %), 2.0 patches/s, done"
    )
    assert rate_line(0, 0, 0.0, "scored", "patches") == "scored 0 / 0 patches (100.0 %)"


def test_the_counter_tells_how_busy_the_workers_were():
    """busy_share: the seconds in work calls over each worker's span from its first call's start
    to its last call's end; a worker that waits between calls is below 1."""
    counter = ProgressCounter.__ray_actor_class__()  # the class behind the actor, no Ray needed
    assert counter.busy_share() is None
    counter.add(4, "a", busy_s=0.2)
    time.sleep(0.4)  # waited 0.4 s for its next input
    counter.add(4, "a", busy_s=0.2)
    share = counter.busy_share()
    assert 0.3 < share < 0.8 and counter.count() == 8
