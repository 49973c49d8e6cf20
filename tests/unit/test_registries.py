"""Contract tests for everything users swap by name: losses, optimisers, patch planners, tasks.

Each test loops over every registered entry, so a newly registered one is checked without a new
test (docs/extending.md). Expectations are invariants: a loss is lower for the right answer, an
optimiser step lowers a convex objective, a planner's patches lie in the volume and its plan is a
pure function of (seed, epoch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sap_lightning.batches.planners import PLANNERS, EpochPlan, PatchPlanner, list_planners
from sap_lightning.batches.store import CaseStore
from sap_lightning.cache import open_cache, preprocess_dataset
from sap_lightning.config.schema import DataConfig, LossConfig, OptimConfig
from sap_lightning.core.errors import ConfigError
from sap_lightning.core.tasks import TASKS
from sap_lightning.modules.losses import create_loss, list_losses, register_loss
from sap_lightning.modules.optim import create_optimizer, list_optimizers
from tests.datasets import write_tiny_dataset

SHAPE = (24, 20, 16)
PATCH = (8, 8, 8)


# ------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("name", list_losses())
def test_every_loss_prefers_the_right_answer_and_passes_gradients(name: str) -> None:
    torch.manual_seed(0)
    labels = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    labels[0, 0, 2:5, 2:5, 2:5] = 1  # one patch with a lesion, one without
    right = torch.where(labels == 1, 4.0, -4.0).repeat(1, 2, 1, 1, 1)
    right[:, 0] *= -1  # background logit high where the label is background
    wrong = -right
    loss_fn = create_loss(LossConfig(name=name))
    logits = wrong.clone().requires_grad_(True)
    bad = loss_fn(logits, labels)
    bad.backward()
    good = loss_fn(right, labels)
    assert bad.ndim == 0 and torch.isfinite(bad) and torch.isfinite(good)
    assert good.item() < bad.detach().item()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    deep = create_loss(LossConfig(name=name), deep_supervision=True)
    assert torch.isfinite(deep([right, right[..., ::2, ::2, ::2]], labels.float()))


def test_unknown_loss_names_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"loss\.name.*dice_ce"):
        create_loss(LossConfig(name="dcie"))


def test_a_loss_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_loss("dice_ce")(lambda cfg: torch.nn.MSELoss())


# --------------------------------------------------------------------------------- optimisers


@pytest.mark.parametrize("name", list_optimizers())
def test_every_optimiser_keeps_group_rates_and_descends(name: str) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Parameter(torch.randn(5))
    decoder = torch.nn.Parameter(torch.randn(5))
    groups = [{"params": [encoder], "lr": 1e-3}, {"params": [decoder], "lr": 1e-2}]
    optimizer = create_optimizer(groups, OptimConfig(optimizer=name, lr=1e-2, weight_decay=0))
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]

    def objective() -> torch.Tensor:
        return (encoder**2).sum() + (decoder**2).sum()

    before = float(objective())
    for _ in range(5):
        optimizer.zero_grad()
        objective().backward()
        optimizer.step()
    assert float(objective()) < before


# ----------------------------------------------------------------------------------- planners


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CaseStore]:
    base = tmp_path_factory.mktemp("registries")
    made = {}
    for task, lesions in (("lesion", [1, 2, 0, 1]), ("skeleton", [2, 1, 1, 2])):
        dataset = write_tiny_dataset(
            base / task, n_cases=4, task=task, shape=SHAPE, lesions_per_case=lesions
        )
        preprocess_dataset(dataset, base / f"{task}_cache")
        made[task] = CaseStore(open_cache(base / f"{task}_cache"))
    return made


def _planner(name: str, stores: dict[str, CaseStore], seed: int = 0) -> PatchPlanner:
    cls = PLANNERS.get(name)
    store = stores["lesion" if cls.requires == "lesion" else "skeleton"]
    case_ids = list(store.cache.case_ids)
    return cls.from_config(
        store, case_ids, PATCH, seed, count=6, multiple=4, data=DataConfig(patch_size=list(PATCH))
    )


@pytest.mark.parametrize("name", list_planners())
def test_every_planner_is_deterministic_in_the_volume_and_rank_even(
    name: str, stores: dict[str, CaseStore]
) -> None:
    planner = _planner(name, stores)
    first, again = planner.plan(0), _planner(name, stores).plan(0)
    assert first == again, "a plan must depend only on (seed, epoch)"
    assert len(first) == planner.num_tasks and planner.num_tasks % 4 == 0
    assert [task.index for task in first] == list(range(len(first)))
    for task in first:
        shape = np.asarray(planner.shapes[task.case_id])
        lo, hi = np.asarray(task.focus[:3]), np.asarray(task.focus[3:])
        assert np.all(lo >= 0) and np.all(hi <= shape) and np.all(hi > lo), task
    assert planner.plan(1) != first, "every epoch draws a new plan"
    assert len(EpochPlan(planner, epoch=3).tasks) == planner.num_tasks


def test_unknown_planner_names_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"data\.sampler.*instance_balanced"):
        PLANNERS.get("instance-balanced")


# -------------------------------------------------------------------------------- task table


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_a_registered_default_planner(name: str) -> None:
    spec = TASKS[name]
    assert spec.default_planner in list_planners()
    requires = PLANNERS.get(spec.default_planner).requires
    assert requires == "none" or spec.labels != "none"
    assert spec.exports_backbone == (name != "lesion")


def test_layout_of_registries_is_documented() -> None:
    guide = Path(__file__).parents[2] / "docs" / "extending.md"
    text = guide.read_text()
    for word in ("register_backbone", "register_loss", "register_planner", "register_optimizer"):
        assert word in text
