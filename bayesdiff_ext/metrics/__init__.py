"""Sample-quality metrics on feature arrays (N, d) and the feature extractors that produce them.

Every metric accepts numpy arrays or torch tensors (any float dtype, any device) and computes its
statistics in float64. Nothing downloads: extractors are the bundled digits classifier, a fixed
random conv net, or modules and weight files the user already has.
"""

from bayesdiff_ext.metrics.extraction import (
    FeatureExtractor,
    FeatureModule,
    extract_features,
    feature_function,
)
from bayesdiff_ext.metrics.frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
)
from bayesdiff_ext.metrics.inception_kl import inception_score
from bayesdiff_ext.metrics.kernel_inception import kid
from bayesdiff_ext.metrics.knn_manifold import prdc
from bayesdiff_ext.metrics.loading import digits_feature_extractor, load_feature_module
from bayesdiff_ext.metrics.random_conv import RandomConvFeatures
from bayesdiff_ext.metrics.rbf_mmd import cmmd
from bayesdiff_ext.metrics.results import PRDC, MeanStd

__all__ = [
    "FeatureExtractor",
    "FeatureModule",
    "MeanStd",
    "PRDC",
    "RandomConvFeatures",
    "cmmd",
    "digits_feature_extractor",
    "extract_features",
    "feature_function",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "inception_score",
    "kid",
    "load_feature_module",
    "prdc",
]
