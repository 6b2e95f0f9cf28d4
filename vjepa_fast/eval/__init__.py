"""Frozen evaluation (the official protocols of V-JEPA 1 and 2): attentive probes trained on augmented clips through
the frozen encoder, cached val features, official eval configs, our linear probe, the synthetic motion benchmark.
`vjepa-fast eval` is the command line."""
from .features import FeatureSet, cached_features, encoder_for_frames
from .official_config import EvalJob, read_eval_config
from .online import EncodedBatches
from .probe import AttentiveProbe, LinearProbe, build_probe
from .protocols import HeadSettings, ProbeResult, ProbeSettings, fit_probe
from .run import load_frozen, probe_encoder, random_init_like
from .synthetic_benchmark import run_synthetic_benchmark
from .views import ViewSpec

__all__ = ["AttentiveProbe", "EncodedBatches", "EvalJob", "FeatureSet", "HeadSettings", "LinearProbe", "ProbeResult",
           "ProbeSettings", "ViewSpec", "build_probe", "cached_features", "encoder_for_frames", "fit_probe",
           "load_frozen", "probe_encoder", "random_init_like", "read_eval_config", "run_synthetic_benchmark"]
