"""Models the pipeline trains: the paper's Xception and its cost/size accounting."""

from pipeline.config import Config
from pipeline.models.xception import Xception, count_parameters, preprocess_input, xception_macs


def build_model(config: Config) -> Xception:
    """The model `config.model` describes, with the logit bias resolved for the configured loss."""
    m = config.model
    return Xception(m.num_classes, fc_layers=m.fc_layers, dropout=m.dropout, head_bias=config.head_bias,
                    width_multiplier=m.width_multiplier, middle_blocks=m.middle_blocks,
                    checkpoint_middle_flow=m.checkpoint_middle_flow)


__all__ = ["Xception", "build_model", "count_parameters", "preprocess_input", "xception_macs"]
