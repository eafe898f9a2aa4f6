"""Sample-quality evaluation: Fréchet distance / IS / precision-recall, ADM sample files, torch-fidelity, digits judge.

Nothing here downloads. torch-fidelity is optional (``pip install 'deqgen[eval]'``) and imported only by
:func:`compute_fidelity_metrics`. The digits judge (:mod:`~deqgen.evaluation.digits_judge`) and ``deqgen report``
(:func:`deqgen.evaluation.make_report.build_report`) read a training run and are imported from their modules, so
that importing this package (the training engine imports :mod:`~deqgen.evaluation.memory`) loads no training code.
"""

from deqgen.evaluation.digits_classifier import (
    DigitsClassifier,
    DigitsClassifierConfig,
    class_accuracy,
    load_digits_classifier,
    per_class_accuracy,
    train_digits_classifier,
)
from deqgen.evaluation.fidelity import (
    INCEPTION_WEIGHTS_FILENAME,
    FeatureFIDMetric,
    compute_fidelity_metrics,
    extract_features,
    resolve_inception_weights,
)
from deqgen.evaluation.frechet import (
    PrecisionRecall,
    RunningStatistics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    precision_recall,
)
from deqgen.evaluation.npz import (
    SampleChunk,
    ShardedSampleWriter,
    merge_shards,
    read_reference_statistics,
    read_samples_npz,
    to_uint8_nhwc,
    write_samples_npz,
)
from deqgen.evaluation.report import ReportError
from deqgen.evaluation.sample_files import (
    SampleSpec,
    merge_samples,
    sample_shards,
    score_samples,
)

__all__ = [
    "INCEPTION_WEIGHTS_FILENAME",
    "DigitsClassifier",
    "DigitsClassifierConfig",
    "FeatureFIDMetric",
    "PrecisionRecall",
    "ReportError",
    "RunningStatistics",
    "SampleChunk",
    "SampleSpec",
    "ShardedSampleWriter",
    "class_accuracy",
    "compute_fidelity_metrics",
    "extract_features",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "load_digits_classifier",
    "merge_samples",
    "merge_shards",
    "per_class_accuracy",
    "precision_recall",
    "read_reference_statistics",
    "read_samples_npz",
    "resolve_inception_weights",
    "sample_shards",
    "score_samples",
    "to_uint8_nhwc",
    "train_digits_classifier",
    "write_samples_npz",
]
