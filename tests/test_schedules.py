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
    assert PruningSchedule(end_step=None).resolve(321).end_step == 321
    with pytest.raises(ValueError, match="before start_step"):
        PruningSchedule(start_step=500, end_step=100).resolve(1000)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "exponential"}, "unknown schedule kind 'exponential'"),
        ({"final_sparsity": 1.0}, "final_sparsity must be a number in"),
        ({"initial_sparsity": -0.2}, "initial_sparsity must be"),
        ({"initial_sparsity": 0.5, "final_sparsity": 0.3}, "above final_sparsity"),
        ({"frequency": 0}, "frequency must be a positive integer"),
        ({"scope": "row"}, "unknown sparsity scope 'row'"),
        ({"end_step": 1.5}, "fraction of training"),
        ({"pattern": "3:2"}, "0 < N < M"),
    ],
)
def test_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningSchedule(**kwargs)


def test_config_yaml_round_trip(tmp_path):
    cfg = PruningConfig(
        method="magnitude",
        schedule=PruningSchedule(kind="linear", final_sparsity=0.75, end_step=0.5, frequency=7, scope="layer"),
        targets=[r"encoder\.layer\.\d+\.output"],
        method_kwargs={"foo": 1},
    )
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(path)
    back = PruningConfig.from_yaml(path)
    assert back == cfg
    assert PruningConfig.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ValueError, match="unknown pruning config field"):
        PruningConfig.from_dict({"metod": "magnitude"})
