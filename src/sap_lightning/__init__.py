"""sap_lightning: Supervised Anatomical Pretraining for bone-metastasis segmentation on WB-MRI."""

__version__ = "0.1.0"
