"""The `fastssl` command: argument parsing and dispatch only."""
import argparse
import sys

from fastssl.config import ConfigError, describe, load_config


def cmd_train(args) -> int:
    from fastssl.train import train   # torch and friends load only when a command needs them
    cfg = load_config(args.config, args.overrides)
    results = train(cfg)
    if results:
        print(f"kNN top-1: simclr={results['knn_top1']:.1f}% random-init={results['knn_top1_random_init']:.1f}%")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl", description="Fast self-supervised learning for vision.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="pre-train (SimCLR), then evaluate by kNN",
                             description="Pre-train, checkpoint every epoch, then print "
                                         "'kNN top-1: simclr=NN.N%% random-init=NN.N%%'.")
    p_train.add_argument("--config", help="YAML config file (see configs/)")
    p_train.add_argument("--help-config", action="store_true", help="list every config key with its default")
    p_train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=1")
    p_train.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    if getattr(args, "help_config", False):
        print(describe())
        return 0
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"fastssl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
