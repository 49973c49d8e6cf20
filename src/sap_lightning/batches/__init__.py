"""Cache -> training batches: patch planners, patch datasets, the TorchIO queue, augmentation and
the Lightning DataModules."""
