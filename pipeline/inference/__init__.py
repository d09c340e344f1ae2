"""Using a trained model: batch prediction on Ray Data (`predict`), its inputs (`sources`), its model
(`model_source`) and its resumable output (`output`)."""
