"""From videos, images or precomputed arrays to descriptor sets and Fisher vectors in a store.

- :mod:`.datasets`: readers of UCF101, CUB-200-2011, ActivityNet v1.3 and one-folder-per-class layouts.
- :mod:`.backbones`: torchvision CNNs truncated at a layer, weights from a local file, fp32/bf16/fp16.
- :mod:`.sources`: video (PyAV seeking or torchcodec, 25 frames, SPP: 50 descriptors/frame), image
  (448 x 448, dense 28 x 28 conv5_4 descriptors, optional box crop), precomputed arrays.
- :mod:`.flow`: optical-flow images (x, y, magnitude, clipped at 20 px) of frame pairs, cached.
- :mod:`.crops`: 10-crop testing (four corners, centre, their mirrors).
- :mod:`.sharded`: a stage that writes a store shard by shard (resume, torchrun journals, report).
- :mod:`.extract`: the batched, overlapped, resumable descriptor stage.
- :mod:`.stages`: FIM estimation, encoding into a Fisher-vector store, a linear-SVM evaluation.
"""

from .backbones import PRECISIONS, PRESETS, Backbone, BackboneError, build_backbone
from .crops import ten_crop
from .datasets import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Dataset,
    DatasetError,
    Item,
    read_activitynet,
    read_cub,
    read_folder,
    read_ucf101,
)
from .extract import default_workers, descriptors_of, extract_descriptors
from .flow import FlowCache, FlowSource, decode_frame_pairs, flow_images
from .sharded import ShardedStage, StageReport
from .sources import (
    DECODERS,
    ImageSource,
    PrecomputedSource,
    SourceError,
    Transform,
    VideoSource,
    array_items,
    decode_video,
    frame_settings,
    sample_indices,
    torchvision_preprocess,
)
from .stages import encode_store, estimate_fim, evaluate_store, set_batches

__all__ = [
    "DECODERS",
    "IMAGE_EXTENSIONS",
    "PRECISIONS",
    "PRESETS",
    "VIDEO_EXTENSIONS",
    "Backbone",
    "BackboneError",
    "Dataset",
    "DatasetError",
    "FlowCache",
    "FlowSource",
    "ImageSource",
    "Item",
    "PrecomputedSource",
    "SourceError",
    "ShardedStage",
    "StageReport",
    "Transform",
    "VideoSource",
    "array_items",
    "build_backbone",
    "decode_frame_pairs",
    "decode_video",
    "default_workers",
    "descriptors_of",
    "encode_store",
    "estimate_fim",
    "evaluate_store",
    "extract_descriptors",
    "flow_images",
    "frame_settings",
    "read_activitynet",
    "read_cub",
    "read_folder",
    "read_ucf101",
    "sample_indices",
    "set_batches",
    "ten_crop",
    "torchvision_preprocess",
]
