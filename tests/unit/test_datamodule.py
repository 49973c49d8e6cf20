"""DataModules: cache and splits built on demand, data-derived properties, batch contracts,
augmentation settings, epoch restarts, rank shares and reproducibility, on tiny cohorts."""

from __future__ import annotations

import itertools
import shutil
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from sap_lightning.batches.datamodule import SapDataModule, build_datamodule
from sap_lightning.batches.planners import POSITIVE, origin_bounds
from sap_lightning.cache.splits import load_splits
from sap_lightning.config import load_config
from sap_lightning.core.errors import ConfigError, DatasetError
from sap_lightning.dataset import layout
from tests.datasets import write_tiny_dataset

PATCH = [8, 8, 8]
SPACING = (1.5, 1.5, 4.0)
NO_AUGMENT = [
    "data.augment.flip_p=0",
    "data.augment.rot90_p=0",
    "data.augment.intensity_p=0",
]


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A lesion dataset (8 patients, 3 folds) and a skeleton dataset (5 volunteers), each with
    its cache and splits built once by a DataModule's ``prepare_data``."""
    base = tmp_path_factory.mktemp("dm")
    lesion = write_tiny_dataset(
        base / "lesion", n_cases=8, shape=(24, 20, 16), lesions_per_case=[1, 2, 3, 0, 2, 1, 2, 1]
    )
    skeleton = write_tiny_dataset(
        base / "skeleton", n_cases=5, task="skeleton", shape=(24, 20, 16), lesions_per_case=4
    )
    for dataset, task in ((lesion, "lesion"), (skeleton, "skeleton")):
        build_datamodule(_config(dataset, task)).prepare_data()
    return {"lesion": lesion, "skeleton": skeleton, "base": base}


def _config(dataset: Path, task: str, *overrides: str):
    return load_config(
        None,
        [
            f"task={task}",
            f"data.dataset={dataset}",
            "data.n_folds=3",
            "data.fold=1",
            "data.tuning_fold=0",
            f"data.patch_size={PATCH}",
            "data.batch_size=2",
            "data.queue_length=6",
            *overrides,
        ],
    )


def _datamodule(dataset: Path, task: str, *overrides: str, world=(1, 0)) -> SapDataModule:
    dm = build_datamodule(_config(dataset, task, *overrides))
    dm.world_size, dm.rank = world  # as the Trainer would set them under DDP
    dm.setup("fit")
    return dm


def _epoch_batches(dm: SapDataModule, epoch: int) -> list[dict]:
    dm.set_train_epoch(epoch)
    return list(dm.train_dataloader())


def _window(array: np.ndarray, location: torch.Tensor) -> np.ndarray:
    lo, hi = location[:3].tolist(), location[3:].tolist()
    return np.asarray(array[(..., *(slice(a, b) for a, b in zip(lo, hi)))])


# --------------------------------------------------------------------------- building and properties


def test_prepare_data_builds_cache_and_splits_where_the_config_says(cohort):
    lesion = cohort["lesion"]
    assert (cohort["base"] / "cache" / "lesion" / "cache.json").is_file()
    assert (lesion / layout.SPLITS_JSON).is_file()
    dm = build_datamodule(_config(lesion, "lesion"))
    splits = load_splits(lesion / layout.SPLITS_JSON)
    assert dm.train_case_ids == splits.train_cases(1)
    assert dm.val_case_ids == splits.tuning_cases()
    assert dm.test_case_ids == splits.test_cases(1)
    assert not set(dm.train_case_ids) & (set(dm.val_case_ids) | set(dm.test_case_ids))


def test_properties_come_from_the_data(cohort):
    lesion = build_datamodule(_config(cohort["lesion"], "lesion"))
    assert lesion.task == "lesion"
    assert lesion.in_channels == 2 and lesion.channel_names == ("T1", "b1000")
    assert lesion.num_classes == 2 and lesion.label_names == ("background", "lesion")
    assert lesion.spacing == SPACING
    skeleton = build_datamodule(_config(cohort["skeleton"], "skeleton"))
    assert skeleton.num_classes == 10
    assert skeleton.label_names == tuple(layout.SKELETON_LABELS)
    ssl = build_datamodule(_config(cohort["skeleton"], "ssl"))
    assert ssl.num_classes is None and ssl.label_names == () and ssl.in_channels == 2
    assert ssl.train_case_ids == skeleton.train_case_ids


def test_missing_cache_is_built_from_the_dataset_on_demand(cohort, tmp_path):
    dataset = shutil.copytree(cohort["skeleton"], tmp_path / "skel")
    (dataset / layout.SPLITS_JSON).unlink()
    cache = tmp_path / "elsewhere" / "c"
    dm = build_datamodule(_config(dataset, "skeleton", f"data.cache={cache}"))
    with pytest.raises(DatasetError, match="not built yet"):
        _ = dm.in_channels
    dm.prepare_data()
    assert (cache / "cache.json").is_file() and (dataset / layout.SPLITS_JSON).is_file()
    assert dm.in_channels == 2


def test_missing_dataset_is_a_clear_error(tmp_path):
    dm = build_datamodule(_config(tmp_path / "nothing", "lesion"))
    with pytest.raises(DatasetError, match="nothing"):
        dm.prepare_data()


def test_task_and_data_must_agree(cohort):
    with pytest.raises(ConfigError, match="skeleton dataset"):
        _ = build_datamodule(_config(cohort["lesion"], "skeleton")).num_classes
    with pytest.raises(ConfigError, match="3 folds with tuning fold 0"):
        _ = build_datamodule(_config(cohort["lesion"], "lesion", "data.n_folds=7")).train_case_ids
    with pytest.raises(ConfigError, match="instance_balanced needs lesion"):
        _ = build_datamodule(
            _config(cohort["skeleton"], "skeleton", "data.sampler=instance_balanced")
        ).in_channels


def test_distributed_trainer_must_not_wrap_the_samplers(cohort):
    dm = build_datamodule(_config(cohort["lesion"], "lesion"))
    dm.trainer = SimpleNamespace(  # the attributes setup reads from a Trainer
        world_size=2,
        global_rank=0,
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=True),
    )
    with pytest.raises(ConfigError, match="use_distributed_sampler=False"):
        dm.setup("fit")
    dm.trainer._accelerator_connector.use_distributed_sampler = False
    dm.setup("fit")
    assert dm.world_size == 2 and len(dm.plan) % 4 == 0


@pytest.mark.parametrize(
    ("limit", "warns"), [(1, True), (0.5, True), (1.0, False), (10_000, False)]
)
def test_cutting_an_instance_balanced_epoch_short_is_warned(cohort, limit, warns):
    dm = build_datamodule(_config(cohort["lesion"], "lesion"))
    dm.trainer = SimpleNamespace(
        world_size=1,
        global_rank=0,
        limit_train_batches=limit,
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=False),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert any("not every lesion once" in str(w.message) for w in caught) == warns


@pytest.mark.parametrize(
    "override",
    ["data.augment.flip_axes=[0,3]", "data.augment.flip_p=1.5", "data.augment.intensity_scale=1"],
)
def test_impossible_augmentation_settings_are_refused(cohort, override):
    with pytest.raises(ConfigError, match=r"data\.augment"):
        build_datamodule(_config(cohort["lesion"], "lesion", override))


def test_unequal_step_counts_across_ranks_stop_training_at_start(cohort):
    dm = _datamodule(cohort["lesion"], "lesion")
    (callback,) = dm.callbacks()
    model = SimpleNamespace(device=torch.device("cpu"))

    def trainer_seeing(*steps: int) -> SimpleNamespace:
        gather = lambda tensor: torch.tensor(steps)  # noqa: E731  what each rank reports
        return SimpleNamespace(current_epoch=0, strategy=SimpleNamespace(all_gather=gather))

    callback.on_train_start(trainer_seeing(dm.steps_per_epoch, dm.steps_per_epoch), model)
    with pytest.raises(RuntimeError, match=r"differ between ranks: \[4, 5\]"):
        callback.on_train_start(trainer_seeing(4, 5), model)


# --------------------------------------------------------------------------- batches


def test_lesion_training_batches(cohort):
    dm = _datamodule(cohort["lesion"], "lesion")
    batches = _epoch_batches(dm, 0)
    assert len(batches) == dm.steps_per_epoch == len(dm.plan) // 2
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (2, 2, *PATCH)
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (2, 1, *PATCH)
        assert set(batch["label"].unique().tolist()) <= {0, 1}
        assert set(batch["case_id"]) <= set(dm.train_case_ids)
    seen = [i for b in batches for i in b["task_index"].tolist()]
    assert sorted(seen) == list(range(len(dm.plan)))  # one epoch = the whole plan, once


def test_skeleton_and_ssl_training_batches(cohort):
    skeleton = _epoch_batches(_datamodule(cohort["skeleton"], "skeleton"), 0)
    assert skeleton[0]["label"].shape == (2, 1, *PATCH)
    assert all(b["label"].amax() > 0 for b in skeleton)  # class-balanced: foreground always
    ssl = _epoch_batches(_datamodule(cohort["skeleton"], "ssl"), 0)
    assert "label" not in ssl[0] and ssl[0]["image"].shape == (2, 2, *PATCH)


def test_validation_and_test_batches_are_whole_cases(cohort):
    dm = _datamodule(cohort["lesion"], "lesion")
    for loader, cases in ((dm.val_dataloader(), dm.val_case_ids),
                          (dm.test_dataloader(), dm.test_case_ids)):  # fmt: skip
        batches = list(loader)
        assert [b["case_id"][0] for b in batches] == cases
        for batch in batches:
            case = dm.store.get(batch["case_id"][0])
            assert batch["image"].shape == (1, 2, 24, 20, 16)
            assert batch["label"].shape == (1, 1, 24, 20, 16)
            assert batch["label"].dtype == torch.int64
            assert batch["spacing"].dtype == torch.float64
            assert batch["spacing"].tolist() == [list(SPACING)]
            np.testing.assert_array_equal(batch["image"][0].numpy(), case.image)
            assert batch["body"].dtype == torch.bool  # for validation.body_only
            np.testing.assert_array_equal(batch["body"][0, 0].numpy(), case.body_mask)


def test_validation_cases_are_split_over_ranks(cohort):
    shares = [
        [
            b["case_id"][0]
            for b in _datamodule(cohort["lesion"], "lesion", world=(2, r)).val_dataloader()
        ]
        for r in (0, 1)
    ]
    cases = build_datamodule(_config(cohort["lesion"], "lesion")).val_case_ids
    assert len(shares[0]) == len(shares[1]) == -(-len(cases) // 2)
    assert set(shares[0]) | set(shares[1]) == set(cases)


def test_ssl_validation_patches_are_fixed(cohort):
    dm = _datamodule(cohort["skeleton"], "ssl")
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(first) >= 1 and "label" not in first[0]
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"]) and a["case_id"] == b["case_id"]
        assert set(a["case_id"]) <= set(dm.val_case_ids)


# --------------------------------------------------------------------------- augmentation


def _patches(dm: SapDataModule, count: int = 12):
    """``count`` augmented training patches (over as many epochs as needed), each with the
    cached image and label under its location, read directly from the memory map."""
    dataset = dm.queue.subjects_dataset
    for number in range(count):
        epoch, index = divmod(number, len(dataset))
        dataset.set_epoch(epoch)
        patch = dataset[index]
        case = dm.store.get(patch["case_id"])
        yield (
            patch,
            _window(case.image, patch["location"]),
            _window(case.label, patch["location"]),
        )


def test_zero_probabilities_give_the_cached_patch_unchanged(cohort):
    dm = _datamodule(cohort["lesion"], "lesion", *NO_AUGMENT)
    for patch, image, label in _patches(dm):
        np.testing.assert_array_equal(patch["image"].numpy(), image)
        np.testing.assert_array_equal(patch["label"].numpy()[0], label)


def test_flips_happen_only_on_the_configured_axes(cohort):
    dm = _datamodule(
        cohort["lesion"],
        "lesion",
        *NO_AUGMENT,
        "data.augment.flip_p=1",
        "data.augment.flip_axes=[1]",
    )
    for patch, image, label in _patches(dm):
        np.testing.assert_array_equal(patch["image"].numpy(), np.flip(image, axis=2))
        np.testing.assert_array_equal(patch["label"].numpy()[0], np.flip(label, axis=1))


@pytest.mark.parametrize(("patch_size", "turns"), [("[8,8,8]", {1, 2, 3}), ("[8,6,8]", {2})])
def test_rotations_are_quarter_turns_in_the_axial_plane(cohort, patch_size, turns):
    dm = _datamodule(
        cohort["lesion"],
        "lesion",
        *NO_AUGMENT,
        "data.augment.rot90_p=1",
        f"data.patch_size={patch_size}",
    )
    seen = set()
    for patch, image, label in _patches(dm, 24):
        matches = [
            k
            for k in range(4)
            if np.array_equal(patch["image"].numpy(), np.rot90(image, k, axes=(1, 2)))
        ]
        assert len(matches) == 1 and matches[0] != 0
        np.testing.assert_array_equal(
            patch["label"].numpy()[0], np.rot90(label, matches[0], axes=(0, 1))
        )
        seen.add(matches[0])
    assert seen == turns


def test_intensity_scale_and_shift_per_channel_within_bounds(cohort):
    dm = _datamodule(
        cohort["lesion"],
        "lesion",
        *NO_AUGMENT,
        "data.augment.intensity_p=1",
        "data.augment.intensity_scale=0.2",
        "data.augment.intensity_shift=0.05",
    )
    factors = []
    for patch, image, label in _patches(dm):
        np.testing.assert_array_equal(patch["label"].numpy()[0], label)  # labels untouched
        for channel in range(2):
            x, y = image[channel].ravel(), patch["image"].numpy()[channel].ravel()
            a, b = np.polyfit(x, y, 1)
            np.testing.assert_allclose(a * x + b, y, atol=1e-5)
            assert 0.8 - 1e-5 <= a <= 1.2 + 1e-5 and abs(b) <= 0.05 + 1e-5
            factors.append(a)
    factors = np.array(factors).reshape(-1, 2)
    assert np.ptp(factors) > 0.05 and not np.allclose(factors[:, 0], factors[:, 1])


# --------------------------------------------------------------------------- epochs and ranks


def test_an_epoch_left_early_restarts_on_the_new_plan(cohort):
    dm = _datamodule(cohort["lesion"], "lesion", *NO_AUGMENT)
    loader = dm.train_dataloader()
    dm.set_train_epoch(0)
    next(iter(loader))  # as with limit_train_batches=1: the queue still holds epoch 0 patches
    batches = _epoch_batches(dm, 1)
    assert len(batches) == dm.steps_per_epoch
    tasks = dm.plan.tasks
    assert dm.plan.epoch == 1
    for batch in batches:
        for index, case_id, location in zip(
            batch["task_index"], batch["case_id"], batch["location"]
        ):
            task = tasks[int(index)]
            assert task.case_id == case_id
            lo, hi = origin_bounds(task, np.array(PATCH), np.array([24, 20, 16]))
            assert np.all(location[:3].numpy() >= lo) and np.all(location[:3].numpy() <= hi)
    assert sorted(i for b in batches for i in b["task_index"].tolist()) == list(range(len(tasks)))


def test_ranks_take_disjoint_shares_covering_the_plan_and_changing_every_epoch(cohort):
    ranks = [_datamodule(cohort["lesion"], "lesion", world=(2, r)) for r in (0, 1)]
    assert ranks[0].plan.tasks == ranks[1].plan.tasks
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch
    lesions = {(t.case_id, t.target) for t in ranks[0].plan.tasks if t.kind == POSITIVE}
    previous = None
    for epoch in range(3):
        shares = []
        for dm in ranks:
            batches = _epoch_batches(dm, epoch)
            assert len(batches) == dm.steps_per_epoch
            shares.append([i for b in batches for i in b["task_index"].tolist()])
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == list(range(len(ranks[0].plan)))
        positives = [
            {(t.case_id, t.target) for i in share if (t := ranks[0].plan.tasks[i]).kind == POSITIVE}
            for share in shares
        ]
        assert positives[0] | positives[1] == lesions and not positives[0] & positives[1]
        assert positives != previous
        previous = positives


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_inside_an_epoch_gives_the_rest_of_each_ranks_share(cohort, workers):
    """The training loader's state (what Lightning's checkpoint keeps) taken after two batches
    and given to a new process's loader: the same epoch goes on with the patches of this rank's
    share that the uninterrupted loader had still to give, the same images, on each of two
    ranks; the next epoch starts from its first patch."""

    def loader_of(rank: int) -> tuple[SapDataModule, Any]:
        dm = _datamodule(cohort["lesion"], "lesion", f"data.num_workers={workers}", world=(2, rank))
        return dm, dm.train_dataloader()

    for rank in (0, 1):
        dm, loader = loader_of(rank)
        whole = _epoch_batches(dm, 1)
        dm, loader = loader_of(rank)
        dm.set_train_epoch(1)
        batches = iter(loader)
        started = [next(batches), next(batches)]
        state = loader.state_dict()
        assert state == {"epoch": 1, "patches": 2 * dm.cfg.data.batch_size}
        dm.queue.close()
        dm, loader = loader_of(rank)  # a new process resuming from the checkpoint
        loader.load_state_dict(state)
        dm.set_train_epoch(1)  # PatchPlanCallback at train start
        rest = list(itertools.islice(iter(loader), dm.steps_per_epoch - 2))
        assert len(rest) == len(whole) - 2
        for got, want in zip(started + rest, whole):
            assert torch.equal(got["task_index"], want["task_index"])
            assert torch.equal(got["image"], want["image"])
        next_epoch = _epoch_batches(dm, 2)
        assert next_epoch[0]["task_index"].tolist() == [
            int(i) for i in list(dm.queue.subject_sampler)[: dm.cfg.data.batch_size]
        ]
        dm.queue.close()


def test_runs_are_reproducible_and_ranks_draw_different_patches(cohort):
    def first_batches(*overrides: str, world=(1, 0)):
        return _epoch_batches(_datamodule(cohort["lesion"], "lesion", *overrides, world=world), 1)[
            :3
        ]

    a, b = first_batches(), first_batches()
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["location"], y["location"])
    with_workers = first_batches("data.num_workers=2")
    for x, y in zip(a, with_workers):
        assert torch.equal(x["image"], y["image"])
    other_seed = first_batches("seed=1")
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, other_seed))


def test_patch_position_and_augmentation_depend_on_the_rank(cohort):
    """The same plan task drawn on two ranks gets a different position / augmentation."""
    datasets = [
        _datamodule(cohort["lesion"], "lesion", world=(2, r)).queue.subjects_dataset for r in (0, 1)
    ]
    differs = [
        not torch.equal(datasets[0][i]["image"].data, datasets[1][i]["image"].data)
        for i in range(len(datasets[0]))
    ]
    assert sum(differs) >= len(differs) // 2


def test_queue_memory_is_bounded_by_queue_and_workers(cohort):
    dm = _datamodule(cohort["lesion"], "lesion", "data.num_workers=3", "data.queue_length=10")
    patch_bytes = 8 * 8 * 8 * (2 * 4 + 1)  # two float32 channels and a uint8 label
    assert dm.queue_memory.patch_bytes == patch_bytes
    assert dm.queue_memory.total_bytes == 10 * patch_bytes + 3 * 2 * 2 * patch_bytes
    assert "MiB" in str(dm.queue_memory)


class _Recorder(L.LightningModule):
    """Records, per step, the epoch, the epoch of the datamodule's plan and the patches seen."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, int, int, str]] = []

    def training_step(self, batch, batch_idx):
        plan_epoch = self.trainer.datamodule.plan.epoch
        for index, case_id in zip(batch["task_index"].tolist(), batch["case_id"]):
            self.seen.append((self.current_epoch, plan_epoch, index, case_id))
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_callback_moves_the_plan_to_each_epoch(cohort):
    dm = build_datamodule(_config(cohort["lesion"], "lesion", *NO_AUGMENT))
    model = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=dm.callbacks(),
    )
    trainer.fit(model, datamodule=dm)
    assert Counter(epoch for epoch, *_ in model.seen) == {0: 4, 1: 4, 2: 4}
    plans = {epoch: dm.plan.planner.plan(epoch) for epoch in range(3)}
    assert plans[0] != plans[1] != plans[2]
    for epoch, plan_epoch, index, case_id in model.seen:
        assert plan_epoch == epoch
        assert plans[epoch][index].case_id == case_id


def test_ssl_views_get_no_geometric_augmentation(cohort):
    """The SSL pretext's own rotation must be the only geometric transform of its views."""
    import torchio as tio

    from sap_lightning.batches.augment import RandomRot90

    lesion = _datamodule(cohort["lesion"], "lesion")
    ssl = _datamodule(cohort["skeleton"], "ssl")
    geometric = (tio.RandomFlip, RandomRot90)

    def kinds(dm) -> set[type]:
        transform = dm.queue.subjects_dataset.transform  # the PatchDataset behind the queue
        return {type(t) for t in (transform.transforms if transform is not None else [])}

    assert any(issubclass(k, geometric) for k in kinds(lesion))
    assert not any(issubclass(k, geometric) for k in kinds(ssl))
