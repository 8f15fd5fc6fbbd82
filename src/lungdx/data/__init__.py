"""Data: manifests, dataset adapters, patient-level splits, caching and synthetic phantoms."""
