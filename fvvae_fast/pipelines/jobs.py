"""The stages as jobs: one typed dataclass per stage whose fields are the stage's settings (defaults,
checks and help in one place, :mod:`.options`), and whose ``run()`` does the work and returns a
report. The command line and the config runner (:mod:`.config`) only build these jobs::

    from fvvae_fast.pipelines.jobs import DescriptorsJob, TrainJob, EncodeJob
    DescriptorsJob(dataset="folder", root="videos", weights="vgg19.pth", out="desc").run()
    TrainJob(descriptors="desc", out="model.pt", iterations=2000).run()
    EncodeJob(model="model.pt", descriptors="desc", out="fisher").run()

Under torchrun every job spreads its work over the processes; its report is the same on every rank.
"""

from __future__ import annotations

from .media_jobs import DescriptorsJob, FinetuneJob
from .model_jobs import EncodeJob, EvaluateJob, FimJob, TrainJob
from .options import Job

JOBS: dict[str, type[Job]] = {job.stage: job for job in (DescriptorsJob, TrainJob, FimJob, EncodeJob, EvaluateJob,
                                                          FinetuneJob)}
