"""Evaluation: MAP@K (the paper's FastEval14k MAP@100) and its companion metrics, one-shot and streaming
(`MeanAveragePrecisionAtK`, a torchmetrics `Metric`)."""

from pipeline.evaluation.map_at_k import (
    MapAtKResult,
    average_precision_at_k,
    class_recall_at_k,
    map_at_k,
    multi_hot,
    precision_at_k,
)
from pipeline.evaluation.map_metric import MeanAveragePrecisionAtK, evaluate_map_at_k

__all__ = [
    "MapAtKResult",
    "MeanAveragePrecisionAtK",
    "average_precision_at_k",
    "class_recall_at_k",
    "evaluate_map_at_k",
    "map_at_k",
    "multi_hot",
    "precision_at_k",
]
