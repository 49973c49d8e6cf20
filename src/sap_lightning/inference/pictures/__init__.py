"""Pictures of a patient: coronal and sagittal MIPs of the inverted b1000 image, lesions outlined.

Whole-body MRI is read on a coronal maximum intensity projection (MIP) of the inverted
diffusion (b=1000) image: metastases, nodes and some organs stand out black on light grey.
Every picture of a patient in the library (``sap predict``, the study report, W&B, notebook
01) is drawn by :func:`draw_case`, so they all look the same and show the same counts.

* The image is brought to RAS+ first (:func:`~sap_lightning.dataset.images.to_canonical`), so
  the picture does not depend on the input's voxel order. Panels are drawn in world mm (the
  physical aspect ratio of anisotropic voxels, the same mm per pixel in both panels), in the
  radiological convention: coronal with the patient's right on the viewer's left, sagittal
  with anterior on the left, head up.
* The grey window comes from the coronal MIP, its body and air told apart by Otsu's threshold
  (:func:`~sap_lightning.inference.pictures.draw.mip_window`), so neither the air's noise nor
  the bladder's glare sets it.
* Lesions are 3D connected components (the evaluation's connectivity), drawn as the outline of
  each component's projected footprint, :data:`OUTLINE_MARGIN_MM` outside it so the lesion's
  own signal stays visible; a lesion whose outline would be smaller than :data:`MIN_OUTLINE_MM`
  gets a ring of that diameter instead, so a 1-voxel lesion stays visible on a whole body.
* With one mask (a prediction, or a reference alone) lesions are coloured by skeletal region,
  with the burden report's regions (:func:`~sap_lightning.inference.burden.lesion_table`);
  with a prediction and a reference, true positive / false positive / false negative under
  the evaluation's matching (:func:`~sap_lightning.metrics.functional.match_lesions`), so the
  legend's counts are ``sap evaluate``'s.
* Colours are module constants; a lesion colour appears only where a lesion of its kind is
  drawn (a legend entry counting none gets no swatch).

Modules: ``content`` (which lesions, kinds, colours, legend), ``draw`` (the figure).
"""

from sap_lightning.inference.pictures.content import (
    FALSE_NEGATIVE,
    FALSE_NEGATIVE_COLOUR,
    FALSE_POSITIVE,
    FALSE_POSITIVE_COLOUR,
    LESION_COLOURS,
    MIN_OUTLINE_MM,
    NOT_ASSESSED_COLOUR,
    OTHER_BONE_COLOUR,
    OUTLINE_MARGIN_MM,
    REGION_COLOURS,
    SKELETON_COLOUR,
    TRUE_POSITIVE,
    TRUE_POSITIVE_COLOUR,
    LegendEntry,
)
from sap_lightning.inference.pictures.draw import (
    CasePicture,
    DrawnLesion,
    Panel,
    b1000_channel_of,
    draw_case,
    mip_window,
)

__all__ = [
    "FALSE_NEGATIVE",
    "FALSE_NEGATIVE_COLOUR",
    "FALSE_POSITIVE",
    "FALSE_POSITIVE_COLOUR",
    "LESION_COLOURS",
    "MIN_OUTLINE_MM",
    "NOT_ASSESSED_COLOUR",
    "OTHER_BONE_COLOUR",
    "OUTLINE_MARGIN_MM",
    "REGION_COLOURS",
    "SKELETON_COLOUR",
    "TRUE_POSITIVE",
    "TRUE_POSITIVE_COLOUR",
    "CasePicture",
    "DrawnLesion",
    "LegendEntry",
    "Panel",
    "b1000_channel_of",
    "draw_case",
    "mip_window",
]
