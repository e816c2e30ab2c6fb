"""Where a run stands, in process: the whole-run estimate, the plain-log throttle, the memory estimate, the lines."""

from __future__ import annotations

import numpy as np
import pytest

from x3d_exp.engine.progress import PlainLogThrottle, RunClock, eval_cost, format_duration, summary_line


def test_the_estimate_leaves_out_the_first_step_and_eval_batch_and_covers_validation_and_test():
    # 10 steps in all, 2 validations of 3 batches, a test of 4 batches.
    clock = RunClock(total_steps=10, steps_done=0, val_batches=3, validations=2, validations_done=0, test_batches=4,
                     eval_cost=0.5, started=0.0)
    assert clock.remaining() is None
    clock.step_done(30.0)  # the compile
    assert clock.remaining() is None
    clock.step_done(2.0)
    # 8 steps x 2 s, and before a timed eval batch 10 eval batches x (2 s x 0.5).
    assert clock.remaining() == pytest.approx(8 * 2.0 + 10 * 1.0)
    clock.eval_batch_done(20.0)  # the eval graph's compile
    clock.eval_batch_done(0.4)
    clock.validation_done()
    assert clock.remaining() == pytest.approx(8 * 2.0 + (3 + 4) * 0.4)


def test_a_resumed_run_counts_what_is_done():
    clock = RunClock(total_steps=100, steps_done=60, val_batches=1, validations=10, validations_done=6,
                     test_batches=0, started=0.0)
    clock.step_done(9.0)
    clock.step_done(1.0)
    assert clock.remaining() == pytest.approx(38 * 1.0 + 4 * 1.0 * clock.eval_cost)
    assert clock.status(now=75.0) == "run 1 min 15 s, about 39 s left"


def test_the_eval_batch_before_one_is_timed_scales_with_crop_and_batch():
    assert eval_cost(16, 64, 16, 64) == pytest.approx(0.35)
    assert eval_cost(16, 64, 32, 128) == pytest.approx(0.35 * 2 * 4)


def test_a_plain_log_gets_at_most_one_line_a_minute():
    throttle = PlainLogThrottle(now=0.0)
    assert [throttle.due(t) for t in (10.0, 59.9, 60.0, 61.0, 119.0, 120.5)] == [False, False, True, False, False,
                                                                                  True]


def test_durations_read_as_a_person_says_them():
    assert [format_duration(s) for s in (4.4, 161, 3600 * 3 + 300, 86400 * 3 + 7200)] == [
        "4 s", "2 min 41 s", "3 h 05 min", "3 d 2 h"]


def test_the_end_line():
    result = {"test_top1": 1.0, "test_top5": 1.0, "test_videos": 32, "val_top1": 1.0, "best_epoch": 14,
              "seconds": 161.0, "run_dir": "/runs/a"}
    assert summary_line(result, "mlflow ui ...") == ("test top-1 100.0% (32/32 videos), top-5 100.0%; best val top-1 "
                                                     "100.0% at epoch 14; 2 min 41 s; run dir /runs/a; view: "
                                                     "mlflow ui ...")


def test_the_memory_estimate_adds_up_and_names_a_batch_that_fits():
    from x3d_exp.engine.memory import (ACTIVATION_COPIES, RUNTIME_BYTES, RUNTIME_BYTES_PER_LAYER, estimate_memory,
                                       memory_warning)
    from x3d_exp.models import build_model
    from x3d_exp.models.summary import trace_network

    network = build_model("x3d_xs", num_classes=4)
    clip = [3, 4, 64, 64]
    params = sum(int(p.size) for p in network.get_parameters())
    layers = trace_network(network, clip).layers
    elements = sum(int(np.prod(layer.out_shape)) for layer in layers)
    sgd = estimate_memory(network, clip, 8, "sgd")
    runtime = RUNTIME_BYTES + RUNTIME_BYTES_PER_LAYER * len(layers)
    # Weights, gradients and two optimizer copies (SGD's accum and stat, AdamW's two moments).
    assert sgd.total == pytest.approx(4 * params * 4 + 4 * 8 * elements * ACTIVATION_COPIES + runtime)
    assert estimate_memory(network, clip, 8, "adamw").total == pytest.approx(sgd.total)
    assert estimate_memory(network, clip, 16, "sgd").activations == pytest.approx(2 * sgd.activations)
    assert memory_warning(sgd, sgd.total + 1) is None
    fits = sgd.batch_that_fits(sgd.total - 2 * sgd.per_clip())
    assert fits == 6
    assert "data.batch_size=6 fits" in memory_warning(sgd, sgd.total - 2 * sgd.per_clip())
