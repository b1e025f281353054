"""Data: sources on disk or in memory, device-resident batches and their augmentation."""
