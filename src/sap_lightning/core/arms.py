"""The arms of the study: one registered object per way of initialising the lesion network.

An arm is what the study compares: ``scratch`` (random initialisation), ``sap`` (a network
pretrained to segment the skeleton), ``ssl`` (Tang et al.'s contrastive pretext) and ``mae``
(a masked autoencoder). Its :class:`Arm` carries everything the rest of the library would
otherwise keep in lists of its own: the pretraining run it needs (task, LightningModule,
recipe, experiment file, config section), what fine-tuning copies from it, and the learning
terms the study report shows for that run. ``model.init`` names an arm; a study file lists the
arms it compares (``arms: [scratch, ssl, sap]``).

Modules are named by class (registered in ``sap_lightning.modules``), so this core module
imports no later stage and the configuration can check arm names without importing torch.
A user adds an arm with :func:`register_arm` (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from sap_lightning.core.errors import ConfigError
from sap_lightning.core.registry import Registry
from sap_lightning.core.tasks import get_task

TRANSFER_MODES = ("all_but_head", "encoder", "full")
"""What fine-tuning copies from a pretrained network (``backbones.transfer.transfer_weights``)."""


@dataclass(frozen=True)
class LearningTerm:
    """A logged value that shows whether a pretraining run learned, as the report shows it."""

    key: str
    """The logged name, e.g. ``train/rotation``."""
    label: str
    """Its column in the report's "Did the networks learn?" table."""
    chance: str | None = None
    """A chance level the report prints beside it (``evaluation.diagnostics.CHANCE_LEVELS``:
    ``rotation``, ``contrastive``); None when the term has none."""


@dataclass(frozen=True)
class Pretraining:
    """How an arm's source network is trained on the healthy scans."""

    task: str
    """The task table row it runs as (``skeleton`` or ``ssl``): what it reads and samples."""
    module: str
    """Its LightningModule's class name (registered in ``sap_lightning.modules``)."""
    recipe: str
    """Recorded in the exported metadata; fine-tuning checks it against the arm."""
    experiment: str
    """Its experiment file's name in a profile folder (``experiments/<profile>/<name>.yaml``)
    and its run folder's name in a study."""
    title: str
    """How the study names the run (step, learning table)."""
    label: str
    """How the study report's header names its experiment file."""
    learning: tuple[LearningTerm, ...]
    """The terms that show learning, in report order; the first is plotted."""
    section: str | None = None
    """The config section holding the recipe's settings (``ssl``, ``mae``; ``pretext`` for an
    arm added by a user), None when it has none of its own."""


@dataclass(frozen=True)
class Arm:
    """One arm of the study."""

    name: str
    description: str
    pretraining: Pretraining | None = None
    """None: the arm starts from random weights."""
    transfer: str | None = None
    """What fine-tuning copies from the pretrained network (one of :data:`TRANSFER_MODES`)."""

    def __post_init__(self) -> None:
        if (self.pretraining is None) != (self.transfer is None):
            raise ValueError(f"arm {self.name!r}: a pretraining needs a transfer mode and back")
        if self.transfer is not None and self.transfer not in TRANSFER_MODES:
            raise ValueError(
                f"arm {self.name!r}: transfer {self.transfer!r} not in {TRANSFER_MODES}"
            )
        if self.pretraining is not None:
            get_task(self.pretraining.task)

    @property
    def finetune_experiment(self) -> str:
        """Its fine-tuning experiment file's name in a profile folder."""
        return f"finetune_{self.name}"


ARMS: Registry[Arm] = Registry("arm", "model.init")


def register_arm(arm: Arm) -> Arm:
    """Add an arm (its name must be new); returns it."""
    return ARMS.register(arm.name)(arm)


def get_arm(name: str) -> Arm:
    return ARMS.get(name)


def list_arms() -> list[str]:
    """Arm names in registration order (the built-ins: scratch, sap, ssl, mae)."""
    return ARMS.in_order()


def pretraining_arm(task: str, name: str | None) -> Arm:
    """The arm a pretraining run of ``task`` trains: ``name`` (``pretraining`` in its config),
    else the task's built-in arm (skeleton: sap, ssl: ssl); refuses an arm of another task."""
    arm = get_arm(name) if name else get_arm(DEFAULT_PRETRAINING[task])
    if arm.pretraining is None:
        raise ConfigError(f"'pretraining' is '{arm.name}', an arm without pretraining")
    if arm.pretraining.task != task:
        raise ConfigError(
            f"'pretraining' is '{arm.name}', whose pretraining runs as task "
            f"'{arm.pretraining.task}', not '{task}'"
        )
    return arm


ROTATION = LearningTerm("train/rotation", "rotation", chance="rotation")
CONTRASTIVE = LearningTerm("train/contrastive", "contrastive", chance="contrastive")
RECONSTRUCTION = LearningTerm("train/reconstruction", "reconstruction")

register_arm(Arm("scratch", "random initialisation: the baseline"))
register_arm(
    Arm(
        "sap",
        "supervised anatomical pretraining: every weight but the output layer from a network "
        "trained to segment the skeleton",
        Pretraining(
            task="skeleton",
            module="SkeletonSegmentation",
            recipe="skeleton",
            experiment="pretrain",
            title="skeleton pretraining",
            label="pretraining",
            learning=(
                LearningTerm("val/dice_skeleton", "whole-skeleton Dice"),
                LearningTerm("val/dice_mean", "mean region Dice"),
            ),
        ),
        transfer="all_but_head",
    )
)
register_arm(
    Arm(
        "ssl",
        "self-supervised pretraining (Tang et al., CVPR 2022: rotation, contrastive and "
        "inpainting terms); the encoder is copied",
        Pretraining(
            task="ssl",
            module="ContrastivePretraining",
            recipe="contrastive",
            experiment="ssl",
            title="SSL pretraining",
            label="SSL",
            learning=(ROTATION, CONTRASTIVE, RECONSTRUCTION),
            section="ssl",
        ),
        transfer="encoder",
    )
)
register_arm(
    Arm(
        "mae",
        "masked-autoencoder pretraining (Wald et al., CVPR 2025; nnssl); the encoder is copied",
        Pretraining(
            task="ssl",
            module="MaskedAutoencoderPretraining",
            recipe="mae",
            experiment="mae",
            title="MAE pretraining",
            label="MAE",
            learning=(RECONSTRUCTION,),
            section="mae",
        ),
        transfer="encoder",
    )
)

DEFAULT_PRETRAINING = {"skeleton": "sap", "ssl": "ssl"}
"""The arm a pretraining run trains when its config names none."""
