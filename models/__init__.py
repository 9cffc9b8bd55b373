"""Network architectures of the three-stage pipeline."""
