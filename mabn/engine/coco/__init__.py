"""Mask R-CNN training engines: torchvision's (``torchvision_engine``) and detectron2's
(``detectron2_*``, which import detectron2 only when imported themselves)."""


def train(cfg, run_dir) -> dict:
    """Run (or resume) Mask R-CNN training with ``cfg.engine.name``'s engine (detectron2's is imported
    only here: without detectron2 it stops with its one-line error)."""
    if cfg.engine.name == "detectron2":
        from .detectron2_trainer import train as engine_train
    else:
        from .torchvision_engine import train as engine_train
    return engine_train(cfg, run_dir)
