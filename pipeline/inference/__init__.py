"""Using a trained model: loading it from a package or a run (`sources`), exporting it (`export`), predicting."""
