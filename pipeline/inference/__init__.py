"""Using a trained model: loading it (`model_source`), exporting it (`export`), and batch prediction on
Ray Data (`predict`) over its inputs (`inputs`) into resumable output (`output`)."""
