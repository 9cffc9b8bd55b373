"""Research tools beside the inference core: training (`three_stage`, `nnunet`, `samples`), cross-validation,
per-stage evaluation (`stagewise`), the lesion rule's choice (`tune`) and the methods side by side (`compare`).
None of it is in the container image."""
