"""The paper's evaluation (section 5, Table 2, Fig. 4-6) on real data, in one run.

- :mod:`.protocol`: signed sqrt + L2, one-vs-all linear SVM (C = 100), top-1, top-3, mAP.
- :mod:`.fusion`: late fusion of several streams' SVM scores, averaging over test crops (Table 4).
- :mod:`.builtin`: the built-in real data (Animal-MNIST through ImageNet MobileNetV2; real clips),
  read from pinned packages, nothing downloaded.
- :mod:`.compare`: FV-VAE (FIM modes, lambda3, latent sizes) against every baseline, the
  Table-2-style table and the figures; resumable.
"""

from .compare import CompareConfig, run_comparison
from .fusion import FusionScores, evaluate_fusion
from .protocol import Scores, evaluate_vectors

__all__ = ["CompareConfig", "FusionScores", "Scores", "evaluate_fusion", "evaluate_vectors", "run_comparison"]
