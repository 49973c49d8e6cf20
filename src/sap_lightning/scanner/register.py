"""Rigid (or translation) registration of a DWI station to the composed T1 (``--register``).

DWI and T1 of one station are acquired minutes apart and EPI is distorted, so the patient may
have moved between them; the scanner's coordinates then disagree by a few millimetres. A rigid
or translation transform per station (Mattes mutual information, since the contrasts differ;
multi-resolution; SimpleITK) corrects the movement. Nothing corrects the EPI distortion itself:
no deformable registration is done. The moving image is the station's lowest b-value (the best
signal); the composed T1 around the station is the other.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

KINDS = ("rigid", "translation")
SAMPLING = 0.25
"""Fraction of fixed voxels drawn for the metric (a fixed seed, so reruns agree)."""
SEED = 20260101


def register_station(t1: sitk.Image, dwi: sitk.Image, kind: str = "rigid") -> sitk.Transform:
    """The transform mapping T1 points to DWI points (what resampling the DWI onto the T1 grid
    needs).

    The DWI station is the fixed image and the composed T1 (which extends beyond the station)
    the moving one, so every metric sample finds T1 data whatever the shift; the result is
    inverted."""
    if kind not in KINDS:
        raise ValueError(f"registration kind {kind!r}: choose one of {', '.join(KINDS)}")
    fixed = sitk.Cast(dwi, sitk.sitkFloat32)
    moving = sitk.Cast(t1, sitk.sitkFloat32)
    if kind == "rigid":
        centre = np.mean(
            [
                fixed.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)])
                for i in (0, fixed.GetSize()[0] - 1)
                for j in (0, fixed.GetSize()[1] - 1)
                for k in (0, fixed.GetSize()[2] - 1)
            ],
            axis=0,
        )
        initial: sitk.Transform = sitk.Euler3DTransform()
        initial.SetCenter(tuple(float(v) for v in centre))
    else:
        initial = sitk.TranslationTransform(3)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING, SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.5
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([4.0, 2.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed, moving)
    return initial.GetInverse()


def describe(transform: sitk.Transform) -> dict:
    """Translation (mm) and, for rigid transforms, rotation angles (degrees) for the manifest."""
    inner = transform
    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms():
        inner = transform.GetNthTransform(0)
    parameters = list(inner.GetParameters())
    if len(parameters) == 6:
        rotation = np.degrees(parameters[:3])
        return {
            "rotation_deg": [round(float(v), 4) for v in rotation],
            "translation_mm": [round(float(v), 4) for v in parameters[3:]],
        }
    return {"translation_mm": [round(float(v), 4) for v in parameters]}
