"""The training recipe: reduce-on-plateau of the learning rate on the validation error, loss weights that ramp
over the run, and the logged rows as TensorBoard scalars."""

import dataclasses
import glob
import json
import os
import struct

import jax
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event
from test_run_safety import StandIn
from test_train import small_config

from distiller.config import Experiment, LossConfig, ValidationConfig, apply_override
from distiller.run_directory import params_template
from distiller.train import loop
from distiller.train.losses import loss_terms, total_loss
from distiller.train.schedules import Plateau, Ramp, after_validation


def test_the_plateau_rule_scales_the_learning_rate_after_patience_validations_without_a_new_best():
    plateau, scales = Plateau(), []
    for error in (0.5, 0.4, 0.4, 0.45, 0.41, 0.39, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        plateau = after_validation(plateau, error, patience=2, factor=0.5, min_scale=0.2)
        scales.append(float(plateau.scale))
    # A new best only when strictly lower; two validations without one halve the scale, not below 0.2.
    assert scales == [float(np.float32(s)) for s in (1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2)]
    assert float(plateau.best) == np.float32(0.39)
    assert after_validation(off := Plateau(), 1.0, patience=0, factor=0.5, min_scale=0.2) is off
    with pytest.raises(ValueError, match=r"optimizer.plateau_patience=3 needs a validation set"):
        Experiment(name="x", optimizer=dataclasses.replace(Experiment(name="x").optimizer, plateau_patience=3))
    with pytest.raises(ValueError, match=r"optimizer.plateau_factor must be in \(0, 1\), got 1.5"):
        apply_override(Experiment(name="x"), "optimizer.plateau_factor=1.5")


def test_a_loss_weight_ramps_from_its_start_to_its_final_value_over_the_run():
    linear, cosine = Ramp(1.0, 11.0), Ramp(1.0, 11.0, "cosine")
    assert [float(linear.at(t / 4)) for t in range(5)] == [1.0, 3.5, 6.0, 8.5, 11.0]
    assert [round(float(cosine.at(t / 4)), 5) for t in range(5)] == [1.0, 2.46447, 6.0, 9.53553, 11.0]
    assert float(linear.at(1.5)) == 11.0 and Ramp(2.0).at(0.5) == 2.0 and not Ramp(2.0, 2.0).ramps

    # From the config (and --set) into the terms; a term weighed only at the end is computed from the start.
    config = apply_override(LossConfig(stress_weight_final=0.5), "energy_weight_final=20")
    terms = loss_terms(config)
    assert [(t.target, t.weight) for t in terms] == [("energy", Ramp(1.0, 20.0)), ("forces", Ramp(10.0)),
                                                     ("stress", Ramp(0.0, 0.5))]
    # In the step the weight comes from the traced step count: one program for every step, the weight logged.
    class Term:
        target = "energy"
        weight = Ramp(1.0, 20.0)

        def __call__(self, predicted, batch):
            return 2.0, {}

    loss = jax.jit(lambda fraction: total_loss((Term(),), None, None, fraction))
    assert [float(loss(t / 4)[0]) for t in range(5)] == [2.0, 11.5, 21.0, 30.5, 40.0]
    assert float(loss(0.5)[1]["energy_weight"]) == 10.5 and loss._cache_size() == 1

    for item, message in [("energy_weight_final=-1", "loss.energy_weight_final must be >= 0, got -1"),
                          ("weight_ramp='exp'", "loss.weight_ramp must be 'linear' or 'cosine', got 'exp'")]:
        with pytest.raises(ValueError, match=message):
            apply_override(LossConfig(), item)


def scalars(run_dir):
    """{tag: [(step, value)]} of RUN/tensorboard/ as TensorBoard shows them (a purge hides the steps from its
    step on), and how many scalar events the files hold in all."""
    shown, raw = {}, 0
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))):
        data, at = open(path, "rb").read(), 0
        while at < len(data):  # TFRecords: length, its crc, the record, its crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            if event.HasField("session_log"):
                shown = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in shown.items()}
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append((event.step, value.simple_value))
                raw += 1
    return shown, raw


class PlateauStandIn(StandIn):
    """test_run_safety's stand-in step (no teacher, no compilation), reporting the scale it was given as the
    real step does."""

    def dispatch_step(self, state, inputs, key):
        new, metrics, overflow = super().dispatch_step(state, inputs, key)
        return new._replace(plateau=state.plateau), {**metrics, "lr_scale": float(state.plateau.scale)}, overflow

    def student(self):
        return None


class ScriptedValidation:
    """A validation whose force RMSE at step s is ERRORS[s]."""

    ERRORS = {1: 0.5, 2: 0.4, 3: 0.45, 4: 0.41, 5: 0.3, 6: 0.35, 7: 0.36, 8: 0.37}

    def __init__(self, structures, student, run_dir):
        pass

    def __call__(self, step, params):
        return {"val_forces_rmse": self.ERRORS[step]}


@pytest.mark.parametrize("in_flight", [0, 1])
def test_the_plateau_scale_is_checkpointed_and_tensorboard_holds_the_logged_rows(tmp_path, structures_dir,
                                                                                 monkeypatch, in_flight):
    """Validated every step with patience 1, the scale halves at each validation without a new best, from the
    next step on (a step dispatched before the validation is redone); a run stopped after halvings resumes from
    its checkpoint exactly (scale, best and wait included); its TensorBoard scalars are metrics.jsonl's rows,
    each step shown once."""
    monkeypatch.setattr(loop, "steps_in_flight", lambda: in_flight)
    monkeypatch.setattr(loop, "read_validation_set", lambda *args, **kwargs: [])
    monkeypatch.setattr(loop, "Validation", ScriptedValidation)
    base = small_config(structures_dir, tmp_path / "whole")
    base = dataclasses.replace(base, validation=ValidationConfig(structures=("validation.extxyz",), every=1),
                               optimizer=dataclasses.replace(base.optimizer, plateau_patience=1))
    template = params_template(base.student)
    train = lambda config, **kwargs: loop.run(config, progress=False, job=PlateauStandIn(template), **kwargs)
    train(base)
    stopped = dataclasses.replace(base, run_dir=str(tmp_path / "stopped"))
    train(stopped, stop_after=6)  # its last checkpoint is step 4's
    train(stopped, resume=True)

    rows = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    again = [json.loads(line) for line in open(tmp_path / "stopped" / "metrics.jsonl")]
    assert [r["lr_scale"] for r in rows] == [1, 1, 1, 0.5, 0.25, 0.25, 0.125, 0.0625]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in again]

    shown, raw = scalars(tmp_path / "stopped")
    assert raw > sum(len(v) for v in shown.values())  # steps 5 and 6 were logged twice, and are shown once
    assert set(shown) == set(again[0]) - {"step"}
    for tag, values in shown.items():
        assert values == [(r["step"], float(np.float32(r[tag]))) for r in again if tag in r], tag
