"""Metrics against a hand-computed example (the expected numbers are worked out below by hand,
not taken from the code under test)."""

from __future__ import annotations

import math

import pytest
import torch

from segclip.train.metrics import ConfusionMatrix, compute_metrics, format_table

V = 255
# 4 classes; class 2 appears nowhere (neither truth nor prediction); class 3 is only predicted.
TARGET = torch.tensor([[0, 0, 0, 1],
                       [1, 1, V, V],
                       [0, 1, 1, 0]])
PRED = torch.tensor([[0, 0, 1, 1],
                     [1, 0, 2, 3],   # the two void pixels are ignored whatever is predicted
                     [3, 1, 1, 0]])
# Counted pixels (truth -> prediction):
#   truth 0 (5 pixels): (0,0)->0 (0,1)->0 (0,2)->1 (2,0)->3 (2,3)->0   => 0:3, 1:1, 3:1
#   truth 1 (5 pixels): (0,3)->1 (1,0)->1 (1,1)->0 (2,1)->1 (2,2)->1   => 0:1, 1:4
HAND_MATRIX = [[3, 1, 0, 1],
               [1, 4, 0, 0],
               [0, 0, 0, 0],
               [0, 0, 0, 0]]
# IoU = TP / (TP + FP + FN):
#   class 0: TP 3, FP 1 (a 1 predicted as 0), FN 2          -> 3/6 = 0.5
#   class 1: TP 4, FP 1 (a 0 predicted as 1), FN 1          -> 4/6 = 2/3
#   class 2: nowhere                                         -> no IoU, not in the mean
#   class 3: TP 0, FP 1, FN 0                                -> 0
# mIoU over the 3 classes present = (0.5 + 2/3 + 0) / 3 = 7/18; pixel accuracy = 7/10.


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(4)
    cm.update(TARGET, PRED)
    assert cm.mat.tolist() == HAND_MATRIX


def test_metrics_by_hand():
    cm = ConfusionMatrix(4)
    cm.update(TARGET, PRED)
    m = compute_metrics(cm.mat, ["bg", "a", "b", "c"])
    assert m["pixels"] == 10
    assert m["pixel_accuracy"] == pytest.approx(0.7)
    assert m["iou"][0] == pytest.approx(0.5)
    assert m["iou"][1] == pytest.approx(2 / 3)
    assert m["iou"][2] is None
    assert m["iou"][3] == 0.0
    assert m["present"] == [True, True, False, True]
    assert m["mean_iou"] == pytest.approx(7 / 18)
    assert m["class_accuracy"][:2] == [pytest.approx(3 / 5), pytest.approx(4 / 5)]
    assert m["class_accuracy"][2] is None and m["class_accuracy"][3] is None
    assert m["iou_by_class"]["a"] == pytest.approx(2 / 3)
    assert not any(isinstance(v, float) and math.isnan(v) for v in m["iou"] if v is not None)


def test_batches_accumulate_and_void_is_ignored():
    whole = ConfusionMatrix(4)
    whole.update(TARGET, PRED)
    parts = ConfusionMatrix(4)
    parts.update(TARGET[:1], PRED[:1])
    parts.update(TARGET[1:], PRED[1:])
    assert torch.equal(whole.mat, parts.mat)
    only_void = ConfusionMatrix(4)
    only_void.update(torch.full((2, 2), V), torch.tensor([[0, 1], [2, 3]]))
    assert only_void.mat.sum() == 0


def test_perfect_and_empty():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 1, 2]))
    m = cm.compute()
    assert m["mean_iou"] == 1.0 and m["pixel_accuracy"] == 1.0
    empty = compute_metrics(torch.zeros(3, 3, dtype=torch.int64))
    assert empty["mean_iou"] is None and empty["pixel_accuracy"] is None and empty["iou"] == [None] * 3


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(2).update(torch.zeros(2, 2), torch.zeros(4))


def test_table_shows_absent_classes_as_dash():
    cm = ConfusionMatrix(4)
    cm.update(TARGET, PRED)
    table = format_table(cm.compute(), ["bg", "a", "b", "c"])
    lines = {line.split()[0]: line for line in table.splitlines() if line.strip() and not line.startswith("-")}
    assert lines["b"].split()[1:] == ["-", "-"]
    assert lines["a"].split()[1] == "0.6667"
    assert "0.3889" in lines["mIoU"] and "3 of 4 classes present" in lines["mIoU"]
    assert "0.7000" in lines["pixel"]
