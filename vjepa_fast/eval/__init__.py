"""Frozen evaluation (paper appendix B): cached encoder features, attentive and linear probes, the synthetic
motion benchmark. `vjepa-fast eval` is the command line."""
from .features import FeatureSet, cached_features, encoder_for_frames
from .probe import AttentiveProbe, LinearProbe, build_probe
from .protocols import ProbeResult, ProbeSettings, fit_probe
from .run import load_frozen, probe_encoder, random_init_like
from .synthetic_benchmark import run_synthetic_benchmark
from .views import ViewSpec

__all__ = ["AttentiveProbe", "FeatureSet", "LinearProbe", "ProbeResult", "ProbeSettings", "ViewSpec", "build_probe",
           "cached_features", "encoder_for_frames", "fit_probe", "load_frozen", "probe_encoder", "random_init_like",
           "run_synthetic_benchmark"]
