"""segclip's segmentation trainer: torchvision segmentation models on PASCAL VOC (or a generated
VOC-format synthetic set), clipped with :func:`segclip.fused_clip_`.

One concern per module:
  palette     the VOC class names and colour palette
  synthetic   generates the deterministic VOC-format synthetic dataset (once, into a cache folder)
  data        finds a VOC root, builds datasets through torchvision's VOCSegmentation, loaders
  transforms  torchvision.transforms.v2 pipelines (masks as tv_tensors.Mask: nearest, void padding)
  models      builds the six torchvision segmentation models (never downloads), loads local weights
  optim       optimizer (fused where torch has it) and the poly LR schedule with linear warmup
  engine      one training epoch: AMP, clipping, non-finite skipping, per-step timings
  metrics     confusion matrix, pixel accuracy, IoU, mIoU, the printed table
  evaluate    runs a model over a split (all ranks) and reduces the confusion matrix
  checkpoint  atomic checkpoint files that load with torch.load(weights_only=True); RNG states
  distributed torchrun / DDP set-up and small collective helpers
  runlog      the run folder: config, per-step JSONL log, per-epoch records
  trainer     `segclip train`: puts the above together, resume included
  predict     `segclip predict`: palette masks and overlays
  plots       `segclip plot`: PNG charts and the max_norm suggestion
  cli         the subcommands' argument parsers
"""
