"""The `fastssl` command: argument parsing and dispatch only."""
import argparse
import sys

from fastssl.config import ConfigError, describe, load_config


def cmd_train(args) -> int:
    from fastssl.train import train   # torch and friends load only when a command needs them
    cfg = load_config(args.config, args.overrides)
    results = train(cfg)
    if results:
        for line in results.get("pretext", []):
            print(line)
        if "knn_top1_random_init_bn" in results:
            print("random-init with batch-norm statistics of the training images: "
                  f"{results['knn_top1_random_init_bn']:.1f}%")
        print(f"kNN top-1: {cfg.method.name}={results['knn_top1']:.1f}% random-init={results['knn_top1_random_init']:.1f}%")
    return 0


def _device(cfg):
    from fastssl.train.trainer import resolve_device
    return resolve_device(cfg.train.device)


def cmd_eval(args) -> int:
    from fastssl.eval.commands import eval_knn, eval_linear, eval_pretext, load_for_eval
    cfg, state = load_for_eval(args.checkpoint, args.config, args.overrides)
    if args.protocol == "knn":
        r = eval_knn(cfg, state, _device(cfg))
        print(f"kNN top-1: {r['knn_top1']:.1f}% (k={cfg.eval.knn_k}, t={cfg.eval.knn_temperature:g}, "
              f"epoch {state['epoch']}, step {state['step']})")
    elif args.protocol == "pretext":
        lines = eval_pretext(cfg, state, _device(cfg))
        if not lines:
            raise ValueError(f"method {cfg.method.name} has no pretext task to evaluate (use knn or linear)")
        print("\n".join(lines))
    else:
        r = eval_linear(cfg, state, _device(cfg))
        print(f"linear top-1: {r['top1']:.1f}% top-5: {r['top5']:.1f}% (train top-1 {r['train_top1']:.1f}%, "
              f"{cfg.eval.linear_epochs} epochs, epoch {state['epoch']}, step {state['step']})")
    return 0


def cmd_export(args) -> int:
    from fastssl.eval.commands import export_backbone, load_for_eval
    cfg, state = load_for_eval(args.checkpoint, args.config, args.overrides)
    out, note = export_backbone(cfg, state, args.out)
    if note:
        print(f"wrote {out}: {note}")
        return 0
    fix = "model.fc = torch.nn.Identity()"
    if cfg.model.stem == "small":
        fix += ("; model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
                "model.maxpool = torch.nn.Identity()")
    print(f"wrote {out}: load with model = torchvision.models.{cfg.model.backbone}(); {fix}; "
          f"model.load_state_dict(torch.load('{out}'))")
    return 0


def cmd_show(args) -> int:
    from fastssl.show import write_show
    state = None
    if args.checkpoint:
        from fastssl.eval.commands import load_for_eval
        cfg, state = load_for_eval(args.checkpoint, args.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    out = write_show(cfg, args.out, state, args.count)
    print(f"wrote {out}: {args.count} training images of method {cfg.method.name} as the model receives them")
    return 0


def cmd_convert(args) -> int:
    from fastssl.data.convert import ConvertError, convert
    try:
        convert(args.src, args.out, max_side=args.max_side, write_mode=args.write_mode,
                jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                workers=args.workers, on_bad_image=args.on_bad_image, force=args.force)
    except (ConvertError, FileExistsError) as exc:
        print(f"fastssl: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl", description="Fast self-supervised learning for vision.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="pre-train (method.name: a method or pretext task), then evaluate by kNN",
                             description="Pre-train, checkpoint every epoch, then print "
                                         "'kNN top-1: <method>=NN.N%% random-init=NN.N%%'.")
    p_train.add_argument("--config", help="YAML config file (see configs/)")
    p_train.add_argument("--help-config", action="store_true", help="list every config key with its default")
    p_train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=1")
    p_train.set_defaults(func=cmd_train)

    def checkpoint_args(p):
        p.add_argument("--checkpoint", required=True, help="a pre-training checkpoint (checkpoints/*.pt)")
        p.add_argument("--config", help="YAML config (default: the config saved in the checkpoint)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.val=...")

    p_eval = sub.add_parser("eval", help="evaluate a checkpoint: knn, linear (frozen backbone) or pretext")
    eval_sub = p_eval.add_subparsers(dest="protocol", required=True)
    p_knn = eval_sub.add_parser("knn", help="weighted kNN top-1 on the val split (eval.knn_k, eval.knn_temperature)")
    checkpoint_args(p_knn)
    p_lin = eval_sub.add_parser("linear", help="linear probe on frozen features: top-1 and top-5 (eval.linear_*)")
    checkpoint_args(p_lin)
    p_pre = eval_sub.add_parser("pretext", help="a pretext task's held-out accuracy or error on the val split")
    checkpoint_args(p_pre)
    p_eval.set_defaults(func=cmd_eval)
    p_export = sub.add_parser("export", help="write the backbone as a torchvision-loadable state dict")
    checkpoint_args(p_export)
    p_export.add_argument("--out", required=True, help="output file, e.g. backbone.pt")
    p_export.set_defaults(func=cmd_export)
    p_show = sub.add_parser("show", help="write a PNG of a training batch as the model receives it")
    p_show.add_argument("--config", help="YAML config file (default: the checkpoint's, else the defaults)")
    p_show.add_argument("--checkpoint", help="show the predictions of this checkpoint's model (pretext tasks)")
    p_show.add_argument("--out", required=True, help="output PNG, e.g. views.png")
    p_show.add_argument("--count", type=int, default=8, help="images to show (default 8)")
    p_show.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. method.name=jigsaw")
    p_show.set_defaults(func=cmd_show)
    p_conv = sub.add_parser("convert", help="write an ImageFolder as an FFCV .beton for data.loader=ffcv",
                            description="Write SRC (one sub-folder per class) as an FFCV dataset (fields image, "
                                        "label) and OUT.beton.json next to it (classes, source file and label "
                                        "of every stored image, skipped files, options).")
    p_conv.add_argument("src", metavar="SRC_IMAGEFOLDER", help="ImageFolder to convert")
    p_conv.add_argument("out", metavar="OUT.beton", help="FFCV file to write (its folder must exist)")
    p_conv.add_argument("--max-side", type=int, default=512,
                        help="downscale images whose longer side is larger to this many pixels; 0 keeps "
                             "the sizes (default 512: decoding time grows with the pixels, and 512 keeps "
                             "over twice the side of a 224-px view; FFCV's ImageNet recipes store 256-512)")
    p_conv.add_argument("--write-mode", choices=("jpg", "raw", "smart", "proportion"), default="jpg",
                        help="jpg: JPEG (small, decoded by libjpeg-turbo); raw: pixels (lossless, large, "
                             "no decoding); smart: raw up to 256x256, JPEG above; proportion: JPEG with "
                             "probability --compress-probability, else raw (default jpg)")
    p_conv.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality, 1-100 (default 90)")
    p_conv.add_argument("--compress-probability", type=float, default=0.5,
                        help="--write-mode proportion: share of images stored as JPEG (default 0.5)")
    p_conv.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    p_conv.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                        help="an unreadable image: error stops naming the file; skip leaves it out and "
                             "lists it in the report and the sidecar (default error)")
    p_conv.add_argument("--force", action="store_true", help="overwrite OUT.beton if it exists")
    p_conv.set_defaults(func=cmd_convert)
    args = parser.parse_args(argv)
    if getattr(args, "help_config", False):
        print(describe())
        return 0
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        # bad input (config, paths, data, settings): the message names it; no traceback needed
        print(f"fastssl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
