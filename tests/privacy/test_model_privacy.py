"""Issue 30, item 5: ``check_model_privacy`` refuses a privacy record that claims a negative, NaN or
malformed epsilon (naming the file and the field); null and "inf" keep meaning "no guarantee". The
readers that call it are tested in tests/lightning_modules/test_checkpoint_privacy.py."""

import math

import pytest

from veil.errors import DataError
from veil.privacy.model_privacy import check_model_privacy

DP = {"enabled": True, "private": True, "epsilon": 2.5, "delta": 1e-6}
WHERE = "runs/x/model/veil_model.json"


@pytest.mark.parametrize("record,expected", [
    (None, math.inf), ({}, math.inf), ({"enabled": False, "epsilon": None}, math.inf),
    ({"enabled": False, "private": False, "epsilon": "inf"}, math.inf),
    ({"enabled": False, "epsilon": float("inf")}, math.inf),  # json Infinity on a non-private model
    ({"enabled": True, "private": True, "epsilon": None, "delta": 1e-6}, math.inf),  # an unbounded DP run
    (DP, 2.5), ({**DP, "epsilon": 0}, 0.0),
    ({"enabled": False, "epsilon": None, "trained_with": DP}, math.inf),  # an unlearned DP classifier
])
def test_accepted_records_give_their_epsilon(record, expected):
    assert check_model_privacy(record, where=WHERE) == expected


@pytest.mark.parametrize("record,field", [
    ({**DP, "epsilon": -1.0}, "privacy.epsilon"), ({**DP, "epsilon": float("nan")}, "privacy.epsilon"),
    ({**DP, "epsilon": float("-inf")}, "privacy.epsilon"), ({**DP, "epsilon": "-1"}, "privacy.epsilon"),
    ({**DP, "epsilon": "low"}, "privacy.epsilon"), ({**DP, "epsilon": True}, "privacy.epsilon"),
    ({**DP, "epsilon": [1.0]}, "privacy.epsilon"),
    ({**DP, "epsilon": float("inf")}, "privacy.epsilon"),  # "private": true with an explicit infinity
    ({**DP, "epsilon": "Infinity"}, "privacy.epsilon"),
    ({**DP, "delta": -1e-6}, "privacy.delta"), ({**DP, "delta": float("nan")}, "privacy.delta"),
    ({**DP, "delta": 1.0}, "privacy.delta"), ({**DP, "private": "yes"}, "privacy.private"),
    ("epsilon 1", "privacy"),
    ({"enabled": False, "epsilon": None, "trained_with": {**DP, "epsilon": -3}}, "privacy.trained_with.epsilon"),
    ({**DP, "initialized_from": {"path": "p", "privacy": {"epsilon": float("nan")}}},
     "privacy.initialized_from.privacy.epsilon"),
])
def test_negative_nan_and_malformed_records_are_refused_naming_file_and_field(record, field):
    with pytest.raises(DataError) as e:
        check_model_privacy(record, where=WHERE)
    assert str(e.value).startswith(f"{WHERE}: {field} ")
