"""LightningDataModules of the sdzero benchmarks: one file per benchmark plus synthetic ones."""
