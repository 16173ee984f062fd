import re

import pytest

from prune_trainer.config import PruningConfig
from prune_trainer.schedules import PruningSchedule


def test_cubic_matches_zhu_gupta_formula():
    s = PruningSchedule(kind="cubic", initial_sparsity=0.1, final_sparsity=0.9, start_step=100, end_step=1100,
                        frequency=100)
    for step in [100, 250, 600, 1000]:
        t = 100 + ((step - 100) // 100) * 100
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 100) / 1000) ** 3
        assert s.target(step) == pytest.approx(expected)
    assert s.target(50) == pytest.approx(0.1)
    assert s.target(1100) == pytest.approx(0.9)
    assert s.target(5000) == pytest.approx(0.9)
    # Monotone non-decreasing.
    values = [s.target(t) for t in range(0, 1200, 7)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_linear_constant_oneshot():
    lin = PruningSchedule(kind="linear", final_sparsity=0.8, start_step=0, end_step=100, frequency=10)
    assert lin.target(50) == pytest.approx(0.4)
    const = PruningSchedule(kind="constant", final_sparsity=0.5, start_step=10, end_step=10)
    assert const.target(9) == 0.0 and const.target(10) == 0.5 and const.target(99) == 0.5
    assert const.is_pruning_step(10) and not const.is_pruning_step(11)
    one = PruningSchedule(kind="oneshot", final_sparsity=0.6, start_step=20, end_step=20)
    assert one.target(19) == 0.0 and one.target(20) == 0.6


def test_pruning_steps_on_frequency_grid_and_end():
    s = PruningSchedule(start_step=10, end_step=55, frequency=20)
    steps = [t for t in range(100) if s.is_pruning_step(t)]
    assert steps == [10, 30, 50, 55]


def test_resolve_fractions():
    s = PruningSchedule(start_step=0.1, end_step=0.7).resolve(1000)
    assert (s.start_step, s.end_step) == (100, 700)
    with pytest.warns(UserWarning, match="never fine-tuned"):
        assert PruningSchedule(end_step=None).resolve(321).end_step == 321
    with pytest.raises(ValueError, match="before start_step"):
        PruningSchedule(start_step=500, end_step=100)
    with pytest.raises(ValueError, match="before start_step"):
        PruningSchedule(start_step=0.5, end_step=100).resolve(1000)


def test_default_schedule_leaves_training_after_the_final_target():
    s = PruningSchedule(final_sparsity=0.5, frequency=10).resolve(400)
    assert s.end_step == 300 and s.target(300) == 0.5


def test_end_step_past_the_run_warns_with_the_sparsity_it_reaches():
    with pytest.warns(UserWarning, match="end_step 100 is past the run's last step 10: the schedule reaches 13.5%"):
        PruningSchedule(final_sparsity=0.5, end_step=100, frequency=1).resolve(10)
    PruningSchedule(kind="oneshot", start_step=5, end_step=None).resolve(10)  # oneshot ignores end_step


def test_scope_and_pattern_moved_to_the_config():
    with pytest.raises(ValueError, match="moved out of the schedule"):
        PruningConfig.from_dict({"schedule": {"final_sparsity": 0.5, "scope": "layer"}})
    with pytest.raises(ValueError, match=re.escape("scope must be 'global' | 'layer', got 'row'")):
        PruningConfig(scope="row")
    with pytest.raises(ValueError, match="0 < N < M"):
        PruningConfig(pattern="3:2")


def test_targets_as_a_string_is_an_error_not_a_list_of_characters():
    with pytest.raises(ValueError, match="targets must be a list of regexes, got the string 'attention'"):
        PruningConfig.from_dict({"targets": "attention"})


def test_unknown_option_keys_name_the_key_and_the_allowed_ones():
    with pytest.raises(ValueError, match="movement options: unknown key 'varient'; did you mean 'variant'"):
        PruningConfig.from_dict({"method": "movement", "options": {"varient": "soft"}})
    with pytest.raises(ValueError, match=re.escape("variant must be 'hard' | 'soft', got 'medium'")):
        PruningConfig.from_dict({"method": "movement", "options": {"variant": "medium"}})
    with pytest.raises(ValueError, match="num_grads must be int, got 'many'"):
        PruningConfig.from_dict({"method": "obert", "options": {"num_grads": "many"}})
    with pytest.raises(ValueError, match="method_kwargs is now pruning.options"):
        PruningConfig.from_dict({"method": "obert", "method_kwargs": {"num_grads": 4}})
    with pytest.raises(ValueError, match="unknown pruning method 'magnitud'"):
        PruningConfig(method="magnitud")


def test_options_round_trip_with_typed_values():
    cfg = PruningConfig.from_dict({"method": "obert", "options": {"num_grads": 8, "damp": 1, "update": "summed"}})
    assert cfg.options.damp == 1.0 and isinstance(cfg.options.damp, float)
    assert PruningConfig.from_dict(cfg.to_dict()) == cfg
    assert PruningConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "exponential"}, re.escape("'constant' | 'oneshot', got 'exponential'")),
        ({"final_sparsity": 1.0}, "final_sparsity must be a number in"),
        ({"initial_sparsity": -0.2}, "initial_sparsity must be"),
        ({"initial_sparsity": 0.5, "final_sparsity": 0.3}, "above final_sparsity"),
        ({"frequency": 0}, "frequency must be a positive integer"),
        ({"end_step": 1.5}, "fraction of training"),
    ],
)
def test_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningSchedule(**kwargs)


def test_config_yaml_round_trip(tmp_path):
    cfg = PruningConfig(
        method="magnitude",
        schedule=PruningSchedule(kind="linear", final_sparsity=0.75, end_step=0.5, frequency=7),
        scope="layer",
        targets=[r"encoder\.layer\.\d+\.output"],
    )
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    back = PruningConfig.from_yaml(path)
    assert back == cfg
    assert PruningConfig.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ValueError, match="pruning: unknown key 'metod'; did you mean 'method'"):
        PruningConfig.from_dict({"metod": "magnitude"})
