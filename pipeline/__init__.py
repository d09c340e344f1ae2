"""Multi-label Xception training at scale: config, storage, data, models, training and evaluation."""
